"""The CUDA kernels, run on the CPU through the emulation of csrc/emu/cuda_emu.h.

The CUDA sources (csrc/cuda/: kernels, launch sequences, op entry points) are compiled by the
host compiler with -DCAPSROUTE_EMULATE and registered as torch.ops.capsroute_emu.* on CPU
tensors. Blocks run one after another and a block's threads as fibers that meet at every
barrier, shuffle and warp-wide instruction, so indexing, fragment layouts, barriers and the
fixed-order reductions are checked against the reference on a machine without a GPU (CI).
It says nothing about speed. Races show where the results change with the schedule
(CAPSROUTE_EMULATION_SCHEDULE, test_thread_order_does_not_change_results); that finds only
the races some order exposes (compute-sanitizer's racecheck on a GPU sees every conflicting
access: tests/sanitize_cuda.sh).

The build takes about a minute, the tests about four; CAPSROUTE_SKIP_EMULATION=1 skips
this module. CAPSROUTE_EMULATION_SANITIZE=1 builds it with AddressSanitizer and UBSan
(out-of-bounds reads and writes of the kernels in global memory; run with the ASan runtime
preloaded, as `make sanitize` does). Shared memory has a guard zone checked after every block
either way.
"""
from __future__ import annotations

import itertools
import os
import pathlib

import pytest
import torch

from capsroute import reference
from conftest import (COPY_OPS, GRAD_TOL, TOL, Shape, as_reference, dtype_id, make_generator,
                      make_route_inputs, make_routing_inputs, randn, rel_err)

ROOT = pathlib.Path(__file__).resolve().parents[1]

if os.environ.get("CAPSROUTE_SKIP_EMULATION", "0") == "1":
    pytest.skip("CAPSROUTE_SKIP_EMULATION=1", allow_module_level=True)


@pytest.fixture(scope="module")
def emu():
    from torch.utils import cpp_extension

    # The CUDA code reads values through reinterpreted pointers as nvcc allows.
    cflags, ldflags, build = ["-O2", "-fno-strict-aliasing", "-DCAPSROUTE_EMULATE"], [], "emulation"
    if os.environ.get("CAPSROUTE_EMULATION_SANITIZE", "0") == "1":
        cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        ldflags += ["-fsanitize=address,undefined"]
        build = "emulation-sanitize"
    build = ROOT / "build" / build
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="capsroute_emu",
        sources=[str(ROOT / "csrc" / "emu" / "emu_ops.cpp")],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.capsroute_emu


# Shapes that take each path of the CUDA kernels: batch tiles of 8 with a remainder, rows of 8
# input dims (16-byte loads) or not, one or two 16-dim row tiles per capsule (D_out <= 16 or
# <= 32), one group of output capsules or several, input capsules over several blocks.
SHAPES = [
    Shape(10, 37, 10, 8, 16),  # the MNIST layer's capsule sizes; 2 batch tiles, 16-byte rows
    Shape(3, 7, 5, 3, 11),     # odd sizes, scalar loads
    Shape(9, 11, 20, 8, 16),   # 20 output capsules: two groups of 16
    Shape(5, 9, 9, 4, 24),     # 24 dims: two row tiles per capsule, groups of 8
    Shape(2, 5, 1, 16, 1),     # N_out = 1, D_out = 1, two chunks of 8 input dims
    Shape(70, 3, 3, 8, 5),     # 9 batch tiles: more than a block's 8 warps
    Shape(16, 9, 20, 8, 32),   # whole batch and row tiles: V and gs have no zeroed padding
]
TINY = Shape(3, 5, 3, 3, 5)
TINY_GROUPS = Shape(3, 4, 17, 3, 5)  # 17 output capsules: two groups of 16
OPTIONS = list(itertools.product([1, 2, 3], [False, True], [False, True], [False, True],
                                 [False, True]))  # iterations, bias, leaky, detach, coupling


def run_emulated(emu, op: str, shape: Shape, dtype, *, iterations: int, bias: bool,
                 leaky: bool, detach: bool, return_coupling: bool, eps: float = 1e-8,
                 tol: float | None = None):
    """The emulated forward and backward op against the float64 reference (forward through
    autograd) on fresh random inputs; asserts the relative errors of v, c and every
    gradient (within TOL and GRAD_TOL of dtype, or `tol` for all of them)."""
    gen = make_generator("emulation", op, tuple(shape), str(dtype), iterations, bias, leaky,
                         detach, return_coupling)
    if op == "dynamic_routing":
        ins = make_routing_inputs(shape, dtype, "cpu", bias=bias, gen=gen)
        leaves = {"u": ins.u, "weight": ins.weight}
    else:
        ins = make_route_inputs(shape, dtype, "cpu", bias=bias, gen=gen)
        leaves = {"u_hat": ins.u_hat}
    if bias:
        leaves["bias"] = ins.bias
    refs = {k: as_reference(t).requires_grad_() for k, t in leaves.items()}
    originals = {k: t.clone() for k, t in leaves.items()}

    fwd = getattr(emu, op)
    bwd = getattr(emu, op + "_backward")
    args = list(ins[:-1])
    v, c, s = fwd(*args, ins.bias, iterations, leaky, detach, eps, return_coupling)
    ref_args = [refs[k] for k in leaves if k != "bias"]
    ref_out = getattr(reference, op)(*ref_args, iterations, bias=refs.get("bias"), leaky=leaky,
                                     detach=detach, eps=eps, return_coupling=True)
    errors = {"v": (rel_err(v, ref_out[0]), TOL[dtype])}
    if return_coupling:
        errors["c"] = (rel_err(c, ref_out[1]), TOL[dtype])
    else:
        assert c.numel() == 0

    # The incoming gradients: of v, and of c when it depends on the inputs.
    grad_v = randn(v.shape, gen, dtype=dtype)
    c_differentiable = return_coupling and not detach and iterations > 1
    grad_c = randn(c.shape, gen, dtype=dtype) if c_differentiable else None
    grads = bwd(grad_v, grad_c, *args, s, bias, iterations, leaky, detach, eps)
    outs = [ref_out[0]] + ([ref_out[1]] if c_differentiable else [])
    gouts = [as_reference(grad_v)] + ([as_reference(grad_c)] if c_differentiable else [])
    ref_grads = torch.autograd.grad(outs, list(refs.values()), gouts)
    names = list(leaves)
    for out, name in ((v, "v"), (c, "c"), *zip(grads, ["grad_" + n for n in names])):
        assert out.is_contiguous(), f"{name}: strides {out.stride()}, not contiguous like its fake"
    for k, name in enumerate(names):
        g = grads[k]
        assert g.shape == leaves[name].shape and g.dtype == dtype, name
        errors["grad_" + name] = (rel_err(g, ref_grads[k]), GRAD_TOL[dtype])
    if not bias:
        assert grads[len(names)].numel() == 0
    for name, t in leaves.items():  # nothing of the caller's is written
        assert torch.equal(t, originals[name]), f"{name} was modified"
    if tol is not None:
        errors = {k: (e, tol) for k, (e, _) in errors.items()}
    bad = {k: f"{e:.2e} > {t:.0e}" for k, (e, t) in errors.items() if not e <= t}
    assert not bad, f"relative errors: {bad}"


@pytest.mark.parametrize("op", ["dynamic_routing", "route"])
@pytest.mark.parametrize("iterations,bias,leaky,detach,coupling", OPTIONS,
                         ids=lambda x: str(int(x)) if isinstance(x, bool) else str(x))
def test_every_option_float64(emu, op, iterations, bias, leaky, detach, coupling):
    run_emulated(emu, op, TINY, torch.float64, iterations=iterations, bias=bias, leaky=leaky,
                 detach=detach, return_coupling=coupling)


@pytest.mark.parametrize("op", ["dynamic_routing", "route"])
@pytest.mark.parametrize("iterations,leaky,detach,coupling",
                         list(itertools.product([2, 3], [False, True], [False, True], [False, True])),
                         ids=lambda x: str(int(x)) if isinstance(x, bool) else str(x))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_groups_every_option(emu, op, iterations, leaky, detach, coupling, dtype):
    """Several groups of output capsules: the softmax statistics made once per iteration by
    a statistics pass per group and merged, used by every group's pass and by the last
    backward pass. In float32 the forward's and gradient passes of dynamic_routing make each
    prediction tile once for its agreement and its sum (group_walk); float64 and route walk
    the predictions twice."""
    run_emulated(emu, op, TINY_GROUPS, dtype, iterations=iterations, bias=True,
                 leaky=leaky, detach=detach, return_coupling=coupling)


@pytest.mark.parametrize("op", ["dynamic_routing", "route"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("detach", [False, True], ids=["exact", "detach"])
def test_shapes_float64(emu, op, shape, detach):
    run_emulated(emu, op, shape, torch.float64, iterations=3, bias=True, leaky=shape.N_out > 9,
                 detach=detach, return_coupling=True)


# More iterations than the last pass loads at once (kept_rows: three in float32, one in
# float64): 4 and 7 leave a partial round of one.
@pytest.mark.parametrize("op", ["dynamic_routing", "route"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("iterations", [4, 7])
def test_many_iterations(emu, op, dtype, iterations):
    run_emulated(emu, op, SHAPES[0], dtype, iterations=iterations, bias=True, leaky=True,
                 detach=False, return_coupling=True)


# Long float32 sums: 150 input capsules per block in the t = 1 pass's sums (the emulation has
# 2 SMs, so plan_chunks makes few chunks), 64 batch tiles per warp in weight_grad's
# accumulators, 64 chunks of 8 input dims in every prediction. The matrix units round toward
# zero (emulated as the hardware does), so a sum kept in their accumulators drifts: such sums
# measured 5.7e-6 (v), 4.7e-6 (grad_weight) and 3.7e-6 (grad_u) here, under the float32
# target of 1e-5 but over this test's bound (and 1e-4 with 3 iterations at D_in = 512);
# products added with FADDs land near 2e-7.
@pytest.mark.parametrize("shape", [Shape(64, 600, 10, 8, 16), Shape(4096, 4, 10, 8, 16),
                                   Shape(16, 8, 10, 512, 16)], ids=str)
def test_long_sums_float32(emu, shape):
    run_emulated(emu, "dynamic_routing", shape, torch.float32, iterations=1, bias=False,
                 leaky=False, detach=False, return_coupling=False, tol=1e-6)


# float32 and the half types stage W[i] as the matrix units' operands (FragmentSource) on
# every shape above; W[i] of a very wide D_in does not fit there and is read from global memory.
# GROUPS_WIDE_IN: several groups with two chunks of input dims (the operands' chunk count not
# compiled in) in every kernel, the group statistics' included.
WIDE_IN = Shape(3, 4, 16, 72, 16)
GROUPS_WIDE_IN = Shape(5, 6, 18, 12, 8)


@pytest.mark.parametrize("shape", SHAPES + [WIDE_IN, GROUPS_WIDE_IN], ids=str)
def test_shapes_float32(emu, shape):
    run_emulated(emu, "dynamic_routing", shape, torch.float32, iterations=3, bias=True,
                 leaky=shape.N_out > 9, detach=False, return_coupling=True)


# The row passes (row_pass_kernel, the forward's and the gradient passes: float32, and the
# half types with CAPSROUTE_ROW_PASS=1, where D_in <= 8, D_out <= 16 and
# N_out * ceil(D_out / 8) <= 20; the shapes above but the groups and the wide ones take them)
# under every forward option, on odd sizes (a batch of 3 in a row tile of 16, two column tiles
# of 11 dims: one warp of a pair has no capsules), 5 row tiles of 3 capsules of 5 dims (two
# blocks), the MNIST layer's capsules (5 for each warp of a pair) and layers whose second warp
# has some of its capsules (4 of 8 with D_out = 8, 2 of 5 with D_out = 13); and the same sizes
# on routing_pass_kernel with CAPSROUTE_ROW_PASS=0. Each with W[i]'s operands staged by the
# block and read by the lanes themselves (CAPSROUTE_ROW_DIRECT=1), and in float32 in
# thread-block clusters (CAPSROUTE_ROW_CLUSTER) whose blocks add up their sums on chip (the
# half types ignore it, so only float32 runs those paths): the MNIST layer's 4 chunks of 10
# capsules make one cluster of 4 blocks, or 2 of 2, or one of 8 with 4 blocks past N_in; 70
# batch elements' 2 chunks one cluster of 2, or of 4 with 2 blocks past N_in.
ROW_PATHS = {"staged": ("1", "0", "1"), "direct": ("1", "1", "1"), "tiles": ("0", "0", "1"),
             "staged-cluster4": ("1", "0", "4"), "direct-cluster2": ("1", "1", "2"),
             "direct-cluster8": ("1", "1", "8")}
DTYPES_ROWS = [torch.float32, torch.float16, torch.bfloat16]


def set_row_path(monkeypatch, path):
    row_pass, direct, cluster = ROW_PATHS[path]
    monkeypatch.setenv("CAPSROUTE_ROW_PASS", row_pass)
    monkeypatch.setenv("CAPSROUTE_ROW_DIRECT", direct)
    monkeypatch.setenv("CAPSROUTE_ROW_CLUSTER", cluster)


@pytest.mark.parametrize("path", ["staged", "direct", "staged-cluster4"])
@pytest.mark.parametrize("iterations,bias,leaky,coupling",
                         list(itertools.product([1, 2, 3], [False, True], [False, True],
                                                [False, True])),
                         ids=lambda x: str(int(x)) if isinstance(x, bool) else str(x))
def test_row_pass_every_option_float32(emu, monkeypatch, iterations, bias, leaky, coupling,
                                       path):
    set_row_path(monkeypatch, path)
    run_emulated(emu, "dynamic_routing", SHAPES[1], torch.float32, iterations=iterations,
                 bias=bias, leaky=leaky, detach=False, return_coupling=coupling)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5], Shape(20, 5, 12, 8, 8),
                                   Shape(20, 5, 7, 6, 13)], ids=str)
@pytest.mark.parametrize("dtype,path", [(dtype, path) for dtype in DTYPES_ROWS
                                        for path in ROW_PATHS
                                        if dtype == torch.float32 or "cluster" not in path],
                         ids=lambda x: dtype_id(x) if isinstance(x, torch.dtype) else x)
def test_row_pass_shapes(emu, monkeypatch, shape, dtype, path):
    set_row_path(monkeypatch, path)
    run_emulated(emu, "dynamic_routing", shape, dtype, iterations=3, bias=True, leaky=True,
                 detach=False, return_coupling=True)


# The backward's last pass with kept couplings on weight_grad_capsules_kernel (a block's warps
# own input capsules and share the batch tiles' rows: float32 and the half types, D_in a
# multiple of 8, and by default at least 6 input capsules a block, which the emulation's 2
# multiprocessors give from N_in = 11 on), against weight_grad_kernel
# (CAPSROUTE_CAPSULE_GRAD=0) and with 5 warps a block asked for (every shape here): last blocks with idle warps (37 = 3 x 12 + 1, 11, 9, 13
# and 8 capsules), two groups of output capsules, two row tiles per capsule (32 dims, and 24:
# the second tile half empty), 13 dims (rows past D_out in the tile), two chunks of input dims;
# 2, 3 and 5 iterations.
@pytest.mark.parametrize("warps", ["", "0", "5"])
@pytest.mark.parametrize("shape,iterations", [(SHAPES[0], 3), (SHAPES[2], 2), (SHAPES[6], 5),
                                              (Shape(9, 13, 6, 16, 16), 3),
                                              (Shape(6, 9, 5, 8, 24), 3),
                                              (Shape(11, 8, 7, 8, 13), 2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_capsule_weight_grad(emu, monkeypatch, shape, iterations, dtype, warps):
    monkeypatch.setenv("CAPSROUTE_CAPSULE_GRAD", warps)
    run_emulated(emu, "dynamic_routing", shape, dtype, iterations=iterations, bias=True,
                 leaky=True, detach=False, return_coupling=True)


# A group's forward and gradient passes with one walk over the predictions (the default
# where W[i] is staged as operands) and with two (CAPSROUTE_GROUP_WALK=0): two groups of 16,
# groups of 8 with two row tiles per capsule (its gradient pass walks twice either way), two
# chunks of input dims.
@pytest.mark.parametrize("walk", ["0", "1"])
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3], GROUPS_WIDE_IN], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_group_walk_switch(emu, monkeypatch, shape, dtype, walk):
    monkeypatch.setenv("CAPSROUTE_GROUP_WALK", walk)
    run_emulated(emu, "dynamic_routing", shape, dtype, iterations=3, bias=True, leaky=True,
                 detach=False, return_coupling=True)


# The switches for measuring one kernel choice against another: a bad value is an error that
# names the variable (CAPSROUTE_GROUP_WALK is read where there are several groups,
# CAPSROUTE_PARK_ROWS where the last pass recomputes the couplings);
# CAPSROUTE_ROW_BLOCKS_PER_SM (the row passes' chunks of input capsules) keeps the results:
# 1 block per multiprocessor planned (the emulation's 2: 2 chunks of 19 capsules), 8 (16
# chunks of 3) and 40 (37 chunks of one), against the default 2 (4 chunks of 10).
@pytest.mark.parametrize("name,value", [("CAPSROUTE_ROW_PASS", "off"),
                                        ("CAPSROUTE_ROW_DIRECT", "yes"),
                                        ("CAPSROUTE_ROW_CLUSTER", "3"),
                                        ("CAPSROUTE_ROW_CLUSTER", "16"),
                                        ("CAPSROUTE_ROW_CLUSTER", "all"),
                                        ("CAPSROUTE_CAPSULE_GRAD", "-1"),
                                        ("CAPSROUTE_CAPSULE_GRAD", "lots"),
                                        ("CAPSROUTE_CAPSULE_GRAD", "5 warps"),
                                        ("CAPSROUTE_ROW_BLOCKS_PER_SM", "0"),
                                        ("CAPSROUTE_ROW_BLOCKS_PER_SM", "two"),
                                        ("CAPSROUTE_GROUP_WALK", "no"),
                                        ("CAPSROUTE_PARK_ROWS", "on"),
                                        ("CAPSROUTE_FIRST_SUMS", "yes"),
                                        ("CAPSROUTE_MAX_SMEM_KB", "0"),
                                        ("CAPSROUTE_MAX_SMEM_KB", "99KB")])
def test_switches_are_checked(emu, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    if name == "CAPSROUTE_PARK_ROWS":  # read by the last pass that recomputes the couplings
        monkeypatch.setenv("CAPSROUTE_COUPLING_CACHE_MB", "0")
    shape = SHAPES[2] if name == "CAPSROUTE_GROUP_WALK" else SHAPES[0]
    with pytest.raises(ValueError, match=f"{name} must be"):
        run_emulated(emu, "dynamic_routing", shape, torch.float32, iterations=2,
                     bias=False, leaky=False, detach=False, return_coupling=False)


@pytest.mark.parametrize("blocks", ["1", "8", "40"])
def test_row_pass_chunks(emu, monkeypatch, blocks):
    monkeypatch.setenv("CAPSROUTE_ROW_BLOCKS_PER_SM", blocks)
    run_emulated(emu, "dynamic_routing", SHAPES[0], torch.float32, iterations=3, bias=True,
                 leaky=True, detach=False, return_coupling=True)


# plan_chunks fills at most one wave of blocks: where the grid's other dimensions (here 3
# blocks of row tiles, B = 130) do not divide it (the emulation's 4 slots at 2 blocks per
# "multiprocessor"), it rounds the chunks down (1 chunk, 3 blocks), not up (2 chunks, 6 blocks:
# 2 past the wave, a second wave as long as the first on a GPU). The sums' bits tell the plans
# apart: the default's are those of one block per multiprocessor (2 slots: 1 chunk), not those
# of 3 (6 slots: 2 chunks), which rounding up would give.
def test_chunks_fill_one_wave(emu, monkeypatch):
    shape = Shape(130, 5, 10, 8, 16)
    run_emulated(emu, "dynamic_routing", shape, torch.float32, iterations=2, bias=False,
                 leaky=False, detach=False, return_coupling=False)
    ins = make_routing_inputs(shape, torch.float32, "cpu", bias=False,
                              gen=make_generator("emulation-one-wave"))
    sums = {}
    for blocks in (None, "1", "3"):
        if blocks is None:
            monkeypatch.delenv("CAPSROUTE_ROW_BLOCKS_PER_SM", raising=False)
        else:
            monkeypatch.setenv("CAPSROUTE_ROW_BLOCKS_PER_SM", blocks)
        sums[blocks] = emu.dynamic_routing(ins.u, ins.weight, None, 2, False, False, 1e-8,
                                           False)[2][1]
    assert torch.equal(sums[None], sums["1"])
    assert not torch.equal(sums[None], sums["3"])


# The backward keeps the gradient passes' couplings for its last pass where they fit
# CAPSROUTE_COUPLING_CACHE_MB (every other test here: they do); with 0 the last pass
# recomputes them from the predictions.
@pytest.mark.parametrize("op", ["dynamic_routing", "route"])
@pytest.mark.parametrize("shape,dtype", [(SHAPES[0], torch.float64), (SHAPES[2], torch.float64),
                                         (SHAPES[3], torch.float32), (WIDE_IN, torch.float32),
                                         (GROUPS_WIDE_IN, torch.float32)], ids=str)
def test_couplings_recomputed(emu, monkeypatch, op, shape, dtype):
    monkeypatch.setenv("CAPSROUTE_COUPLING_CACHE_MB", "0")
    run_emulated(emu, op, shape, dtype, iterations=3, bias=True, leaky=shape.N_out > 9,
                 detach=False, return_coupling=True)


# The recomputing last pass in float32 accumulation parks the rows of V^(t-1) and gs^(t) that
# it reads twice in each warp's shared memory (weight_grad_kernel's kPark), where the layout
# fits the block: up to 220 KB of the emulated H100's 227 for these shapes (one group, two
# groups, two row tiles per capsule, 9 batch tiles, scalar loads). CAPSROUTE_PARK_ROWS=0 reads
# them from global memory twice. The same bits either way, and the reference's values.
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[5], SHAPES[6],
                                   TINY_GROUPS], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parked_rows(emu, monkeypatch, shape, dtype):
    monkeypatch.setenv("CAPSROUTE_COUPLING_CACHE_MB", "0")
    run_emulated(emu, "dynamic_routing", shape, dtype, iterations=3, bias=True, leaky=True,
                 detach=False, return_coupling=True)
    run = emulated_runner(emu, "dynamic_routing", shape, dtype, "emulation-parked-rows")
    parked = run()
    monkeypatch.setenv("CAPSROUTE_PARK_ROWS", "0")
    differ = [k for k, (a, b) in enumerate(zip(parked, run())) if not torch.equal(a, b)]
    assert not differ, f"outputs {differ} (v, c, s, grads) differ with the rows parked"


# The forward's first iteration as one matrix product (first_sums_kernel: D_in a multiple of
# 8, u and W 16-byte aligned; every shape of this file with D_in = 8 takes it by default),
# against the pass it replaces (CAPSROUTE_FIRST_SUMS=0), each checked against the reference.
# Chunks of 32 input dims that end inside a capsule (D_in = 24, 72), two blocks of batch rows
# (70), two and four blocks of columns (J = 320, 640), one column (J = 1), two 8-dim halves per
# capsule (D_in = 16), a chunk whose block has 3 chunks, the last one 16 dims; the half types
# (one product a tile, 16-byte pieces of 8 elements).
FIRST_SUMS_SHAPES = [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[5], SHAPES[6], WIDE_IN,
                     Shape(5, 7, 3, 24, 8)]


@pytest.mark.parametrize("shape", FIRST_SUMS_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("first_sums", ["1", "0"])
def test_first_sums(emu, monkeypatch, shape, dtype, first_sums):
    monkeypatch.setenv("CAPSROUTE_FIRST_SUMS", first_sums)
    for iterations in (1, 3):
        run_emulated(emu, "dynamic_routing", shape, dtype, iterations=iterations, bias=True,
                     leaky=True, detach=False, return_coupling=False)


def test_first_sums_are_used(emu, monkeypatch):
    """The switch reaches the kernel: with 20 output capsules the pass it replaces is
    routing_pass_kernel's, whose products take W as A and u as B (the product takes u as A), so
    the two small terms of 3xTF32 round in another order and the bits of s^(1) differ; and the
    default is the product. (row_pass_kernel's t = 1 pass makes the same products in the same
    order over the same chunks: on the MNIST layer's sizes the two give the same bits.)"""
    gen = make_generator("emulation-first-sums")
    ins = make_routing_inputs(SHAPES[2], torch.float32, "cpu", bias=False, gen=gen)
    sums = {}
    for value in ("0", "1", None):
        if value is None:
            monkeypatch.delenv("CAPSROUTE_FIRST_SUMS")
        else:
            monkeypatch.setenv("CAPSROUTE_FIRST_SUMS", value)
        sums[value] = emu.dynamic_routing(ins.u, ins.weight, None, 1, False, False, 1e-8, False)[2]
    assert not torch.equal(sums["0"], sums["1"])
    assert torch.equal(sums[None], sums["1"])


@pytest.mark.parametrize("value", ["-1", "lots", "12MB"])
def test_coupling_cache_budget_is_checked(emu, monkeypatch, value):
    monkeypatch.setenv("CAPSROUTE_COUPLING_CACHE_MB", value)
    with pytest.raises(ValueError, match="CAPSROUTE_COUPLING_CACHE_MB must be a whole number"):
        run_emulated(emu, "dynamic_routing", TINY, torch.float64, iterations=2, bias=False,
                     leaky=False, detach=False, return_coupling=False)


# GPUs other than the H100 give a block less shared memory: 163 KB at compute capability 8.0
# (A100), 99 KB at 8.6, 8.9 and 12.0 (RTX 30xx-50xx, A10, L4, L40). CAPSROUTE_MAX_SMEM_KB makes
# the emulated GPU (an H100's 227 KB) such a GPU: it refuses a launch over that, as a GPU
# does, so each plan must stage less where less fits. At 227 KB these shapes ask up to 184 KB
# of a block. (test_ops.py's test_less_shared_memory_cuda runs the same on a GPU.) 90 KB is less than any
# GPU the kernels run on allows; there the row passes' gradient pass (97 KB for the MNIST
# layer) gives way to routing_pass_kernel's too, and the last pass recomputes the couplings.
# Shape(64, 24, ...): the MNIST layer's blocks (4 row tiles; a kept last pass of 12 warps
# on the emulation's 2 "multiprocessors", 140 KB).
@pytest.mark.parametrize("smem_kb", [163, 99, 90])
@pytest.mark.parametrize("op,shape,dtype", [
    ("dynamic_routing", Shape(64, 24, 10, 8, 16), torch.float32),
    ("dynamic_routing", Shape(64, 24, 10, 8, 16), torch.float64),
    ("dynamic_routing", Shape(64, 24, 10, 8, 16), torch.bfloat16),
    ("dynamic_routing", SHAPES[6], torch.float64),
    ("dynamic_routing", WIDE_IN, torch.float32),
    ("dynamic_routing", GROUPS_WIDE_IN, torch.float32),
    ("route", SHAPES[6], torch.float32),
], ids=str)
def test_less_shared_memory(emu, monkeypatch, smem_kb, op, shape, dtype):
    monkeypatch.setenv("CAPSROUTE_MAX_SMEM_KB", str(smem_kb))
    run_emulated(emu, op, shape, dtype, iterations=3, bias=True, leaky=False, detach=False,
                 return_coupling=True)


def test_older_gpus_are_refused(emu, monkeypatch):
    """Below compute capability 8.0 (no TF32 matrix products, no cp.async) every op says so
    before it launches anything; the input checks come first."""
    monkeypatch.setenv("CAPSROUTE_EMULATION_CC", "7.5")
    u, w = torch.randn(2, 4, 8), torch.randn(4, 3, 16, 8)
    u_hat, s, g = torch.randn(2, 4, 3, 16), torch.randn(3, 2, 3, 16), torch.randn(2, 3, 16)
    calls = {
        "dynamic_routing": lambda: emu.dynamic_routing(u, w, None, 3, False, False, 1e-8, False),
        "route": lambda: emu.route(u_hat, None, 3, False, False, 1e-8, False),
        "dynamic_routing_backward": lambda: emu.dynamic_routing_backward(
            g, None, u, w, s, False, 3, False, False, 1e-8),
        "route_backward": lambda: emu.route_backward(g, None, u_hat, s, False, 3, False, False,
                                                     1e-8),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"capsroute\.{name}: the CUDA kernels need a GPU "
                           r"of compute capability 8\.0 or newer .* is 7\.5; run it on CPU"):
            call()
    with pytest.raises(ValueError, match="iterations >= 1"):
        emu.dynamic_routing(u, w, None, 0, False, False, 1e-8, False)
    monkeypatch.setenv("CAPSROUTE_EMULATION_CC", "8.0")
    assert emu.dynamic_routing(u, w, None, 3, False, False, 1e-8, False)[0].shape == (2, 3, 16)


@pytest.mark.parametrize("op", ["dynamic_routing", "route"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_dtypes(emu, op, dtype):
    run_emulated(emu, op, SHAPES[0], dtype, iterations=3, bias=True, leaky=False,
                 detach=False, return_coupling=True)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_backward_conversions(emu, dtype, shape):
    """The backward op converts nothing it need not: the sweep reads grad_v in the inputs'
    dtype, and with one group of output capsules the last pass writes grad_u in its dtype.
    Only grad_u's per-group float32 parts are converted, once summed, in the half types.
    Against the float64 reference too."""
    gen = make_generator("emulation-conversions", tuple(shape), str(dtype))
    ins = make_routing_inputs(shape, dtype, "cpu", bias=False, gen=gen)
    v, _, s = emu.dynamic_routing(ins.u, ins.weight, None, 3, False, False, 1e-8, False)
    grad_v = randn(v.shape, gen, dtype=dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        grads = emu.dynamic_routing_backward(grad_v, None, ins.u, ins.weight, s, False, 3, False,
                                             False, 1e-8)[:2]
    copies = {e.name for e in prof.events()} & COPY_OPS
    groups = shape.N_out > 16
    assert copies == ({"aten::copy_"} if groups and dtype != torch.float32 else set())
    refs = [as_reference(t).requires_grad_() for t in (ins.u, ins.weight)]
    ref_grads = torch.autograd.grad(reference.dynamic_routing(*refs), refs, as_reference(grad_v))
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == dtype and rel_err(grad, ref) <= GRAD_TOL[dtype]


def test_empty_batch(emu):
    u = torch.randn(0, 4, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 16, 8, dtype=torch.float64)
    v, c, s = emu.dynamic_routing(u, w, None, 3, False, False, 1e-8, True)
    assert v.shape == (0, 3, 16) and c.shape == (0, 4, 3) and s.shape == (3, 0, 3, 16)


def test_wide_capsules_are_refused(emu):
    """The CUDA kernels hold at most two 16-dim row tiles per capsule: D_out > 32 is a clear
    error, not a wrong answer."""
    u = torch.randn(2, 4, 8)
    w = torch.randn(4, 3, 33, 8)
    with pytest.raises(ValueError, match="at most 32 dims"):
        emu.dynamic_routing(u, w, None, 3, False, False, 1e-8, False)


@pytest.mark.parametrize("op", ["dynamic_routing", "route"])
@pytest.mark.parametrize("shape,dtype", [(SHAPES[0], torch.float32), (SHAPES[2], torch.float32),
                                         (SHAPES[5], torch.float32), (SHAPES[3], torch.bfloat16),
                                         (TINY_GROUPS, torch.float64)], ids=str)
def test_thread_order_does_not_change_results(emu, monkeypatch, op, shape, dtype):
    """Races: run forward and backward with the threads of every block (and the blocks of
    every launch) in random orders, and with cp.async copies landing early or late
    (CAPSROUTE_EMULATION_SCHEDULE); code that reads or writes what another thread writes with
    no barrier between them gives different bits under different orders."""
    check_thread_order(emu, monkeypatch, op, shape, dtype)


# The same for the last pass recomputing the couplings (CAPSROUTE_COUPLING_CACHE_MB=0; two
# groups).
@pytest.mark.parametrize("shape,dtype", [(SHAPES[0], torch.float32), (SHAPES[2], torch.bfloat16),
                                         (TINY_GROUPS, torch.float64)], ids=str)
def test_thread_order_recomputing(emu, monkeypatch, shape, dtype):
    monkeypatch.setenv("CAPSROUTE_COUPLING_CACHE_MB", "0")
    check_thread_order(emu, monkeypatch, "dynamic_routing", shape, dtype)


# The same for the row passes whose lanes read W[i] themselves (CAPSROUTE_ROW_DIRECT=1):
# their pairs meet only each other, and their softmax statistics alternate between two sets;
# 70 batch elements are 5 row tiles, a block of 4 and one of 1 (3 idle pairs).
@pytest.mark.parametrize("shape,dtype", [(SHAPES[0], torch.float32), (SHAPES[5], torch.float32),
                                         (SHAPES[0], torch.bfloat16)], ids=str)
def test_thread_order_direct_rows(emu, monkeypatch, shape, dtype):
    set_row_path(monkeypatch, "direct")
    check_thread_order(emu, monkeypatch, "dynamic_routing", shape, dtype)


# The same for the row passes in clusters: each block reads the others' sums from their shared
# memory between two cluster barriers; the clusters' blocks run together, in random orders.
@pytest.mark.parametrize("path", ["staged-cluster4", "direct-cluster2", "direct-cluster8"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5]], ids=str)
def test_thread_order_cluster_rows(emu, monkeypatch, shape, path):
    set_row_path(monkeypatch, path)
    check_thread_order(emu, monkeypatch, "dynamic_routing", shape, torch.float32)


def emulated_runner(emu, op, shape, dtype, seed_name):
    """A function that runs the emulated forward and backward (3 iterations, bias, leaky,
    the couplings returned and differentiated) on the same fresh random inputs at each call,
    and returns [v, c, s, *gradients]: for comparing bits across settings."""
    gen = make_generator(seed_name, op, tuple(shape), str(dtype))
    make = make_routing_inputs if op == "dynamic_routing" else make_route_inputs
    ins = make(shape, dtype, "cpu", bias=True, gen=gen)
    args = list(ins[:-1])
    grad_v = randn((shape.B, shape.N_out, shape.D_out), gen, dtype=dtype)
    grad_c = randn((shape.B, shape.N_in, shape.N_out), gen, dtype=dtype)

    def run():
        fwd, bwd = getattr(emu, op), getattr(emu, op + "_backward")
        v, c, s = fwd(*args, ins.bias, 3, True, False, 1e-8, True)
        return [v, c, s, *bwd(grad_v, grad_c, *args, s, True, 3, True, False, 1e-8)]

    return run


def check_thread_order(emu, monkeypatch, op, shape, dtype):
    run = emulated_runner(emu, op, shape, dtype, "emulation-schedule")
    monkeypatch.delenv("CAPSROUTE_EMULATION_SCHEDULE", raising=False)
    expected = run()
    for seed in ["1", "2"]:
        monkeypatch.setenv("CAPSROUTE_EMULATION_SCHEDULE", seed)
        got = run()
        differ = [k for k, (a, b) in enumerate(zip(expected, got)) if not torch.equal(a, b)]
        assert not differ, f"outputs {differ} (v, c, s, grads) change with schedule {seed}"


def test_unaligned_weight(emu, monkeypatch):
    """A weight whose data is not 16-byte aligned (a view at an odd offset) is staged with
    plain copies instead of 16-byte cp.async (which would fault on a GPU, and aborts in the
    emulation); the results are the same bits as for an aligned copy. (Both take
    weight_grad_kernel's last pass and the first pass: weight_grad_capsules_kernel and
    first_sums_kernel, which need aligned rows, sum in other orders.)"""
    monkeypatch.setenv("CAPSROUTE_CAPSULE_GRAD", "0")
    monkeypatch.setenv("CAPSROUTE_FIRST_SUMS", "0")
    shape = SHAPES[0]
    gen = make_generator("emulation-unaligned")
    ins = make_routing_inputs(shape, torch.float32, "cpu", bias=False, gen=gen)
    unaligned = torch.empty(ins.weight.numel() + 1)[1:].view_as(ins.weight).copy_(ins.weight)
    assert unaligned.data_ptr() % 16 != 0 and unaligned.is_contiguous()
    grad_v = randn((shape.B, shape.N_out, shape.D_out), gen, dtype=torch.float32)
    results = []
    for w in (ins.weight, unaligned):
        v, c, s = emu.dynamic_routing(ins.u, w, None, 3, False, False, 1e-8, True)
        results.append([v, c, *emu.dynamic_routing_backward(grad_v, None, ins.u, w, s, False, 3,
                                                             False, False, 1e-8)[:2]])
    for name, a, b in zip(["v", "c", "grad_u", "grad_weight"], *results):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("path", ["default", "direct"])
@pytest.mark.parametrize("shape,where", [(SHAPES[0], (3, 2, 5, 1)), (SHAPES[5], (1, 2, 4, 7))],
                         ids=["mnist", "last-capsule"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("bad", ["nan", "nan_all_bits", "inf"])
def test_non_finite_weight_propagates(emu, monkeypatch, dtype, bad, shape, where, path):
    """A NaN or Inf in the weights survives the TF32 split of the matrix units (a NaN whose
    mantissa bits are all set rounds to a finite hi part; its lo part stays NaN): v, c and
    the gradients are non-finite exactly where the reference's are. Also in the last output
    capsule of a layer whose row passes walk a column tile past N_out (3 capsules, in fours),
    which CAPSROUTE_ROW_DIRECT=1 fills with that capsule's weights, to go into no result."""
    if path != "default":
        set_row_path(monkeypatch, path)
    ins = make_routing_inputs(shape, dtype, "cpu", bias=False, gen=make_generator("emu-nonfinite"))
    w = ins.weight.clone()
    value = {"nan": torch.tensor(float("nan")), "inf": torch.tensor(float("inf")),
             "nan_all_bits": torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)}[bad]
    w[where] = value.to(dtype)
    v, c, s = emu.dynamic_routing(ins.u, w, None, 3, False, False, 1e-8, True)
    grad_u, grad_w, _ = emu.dynamic_routing_backward(torch.ones_like(v), None, ins.u, w, s, False,
                                                     3, False, False, 1e-8)
    u64, w64 = as_reference(ins.u).requires_grad_(), as_reference(w).requires_grad_()
    v_ref, c_ref = reference.dynamic_routing(u64, w64, 3, return_coupling=True)
    ref_grads = torch.autograd.grad(v_ref, (u64, w64), torch.ones_like(v_ref))
    for name, got, want in [("v", v, v_ref), ("c", c, c_ref), ("grad_u", grad_u, ref_grads[0]),
                            ("grad_weight", grad_w, ref_grads[1])]:
        assert torch.equal(got.isfinite(), want.isfinite()), name
        assert not got.isfinite().all(), name
