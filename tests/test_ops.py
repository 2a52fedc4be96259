"""Values and gradients of the capsroute ops against the reference (DESIGN.md sections 1-2),
and their integration with PyTorch: gradcheck, opcheck, torch.compile, autocast, empty
batches, strided inputs, no writes into and no aliasing of the caller's tensors."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.autograd import gradcheck

import capsroute
from capsroute import _ops, reference
from conftest import (CANONICAL, COPY_OPS, DEVICES, DTYPES, FULL_DTYPES, GRAD_TOL, OPS,
                      SMALL_SHAPES, TOL, Shape, as_reference, assert_close_rel, dtype_id,
                      make_generator, make_route_inputs, make_routing_inputs, randn, rel_err,
                      run_case)

# (bias, leaky, detach, return_coupling): every combination.
FLAGS = list(itertools.product([False, True], repeat=4))


def flags_id(flags) -> str:
    names = ("bias", "leaky", "detach", "coupling")
    return "-".join(n for n, f in zip(names, flags) if f) or "plain"


def _cases():
    """Every option on every odd shape for the full-precision types; half types on every
    shape and flag too, with two iteration counts (their rounding hides nothing new)."""
    for dtype in DTYPES:
        iterations = [1, 2, 3, 5] if dtype in FULL_DTYPES else [2, 5]
        for shape, it, flags in itertools.product(SMALL_SHAPES, iterations, FLAGS):
            yield pytest.param(shape, it, flags, dtype,
                               id=f"{shape}-it{it}-{flags_id(flags)}-{dtype_id(dtype)}")


# --- values and gradients against the reference ------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,iterations,flags,dtype", list(_cases()))
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(op, shape, iterations, flags, dtype, device):
    bias, leaky, detach, return_coupling = flags
    run_case(op, shape, dtype, device, iterations=iterations, bias=bias, leaky=leaky,
             detach=detach, return_coupling=return_coupling)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("flags", [(False, False, False, False), (True, True, False, True),
                                   (True, False, True, True)], ids=flags_id)
@pytest.mark.parametrize("op", OPS)
def test_matches_reference_canonical_shape(op, flags, dtype, device):
    """The MNIST DigitCaps layer (N_in=1152, N_out=10, D_in=8, D_out=16), 3 iterations."""
    bias, leaky, detach, return_coupling = flags
    run_case(op, CANONICAL, dtype, device, iterations=3, bias=bias, leaky=leaky,
             detach=detach, return_coupling=return_coupling)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("shape", [CANONICAL, Shape(9, 11, 20, 8, 16)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op", OPS)
def test_couplings_recomputed_cuda(op, dtype, shape, monkeypatch):
    """CAPSROUTE_COUPLING_CACHE_MB=0: the CUDA backward's last pass recomputes the couplings
    that it reads from the gradient passes in every other case (20 output capsules: two
    groups, with their shared softmax statistics)."""
    monkeypatch.setenv("CAPSROUTE_COUPLING_CACHE_MB", "0")
    run_case(op, shape, dtype, "cuda", iterations=3, bias=True, leaky=True, detach=False,
             return_coupling=True)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("shape", [CANONICAL, Shape(9, 11, 20, 8, 16), Shape(16, 300, 20, 8, 32)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_parked_rows_cuda(dtype, shape, monkeypatch):
    """The last pass that recomputes the couplings parks the rows of V and dL/ds that it reads
    twice in shared memory where they fit the block (an H100: 217-220 KB of its 227): the same
    bits as with CAPSROUTE_PARK_ROWS=0, which reads them from global memory twice (the values
    against the reference: test_couplings_recomputed_cuda)."""
    monkeypatch.setenv("CAPSROUTE_COUPLING_CACHE_MB", "0")
    gen = make_generator("parked-rows-cuda", tuple(shape), str(dtype))
    u, weight, bias = make_routing_inputs(shape, dtype, "cuda", bias=True, gen=gen,
                                          requires_grad=True)
    grad_v = randn((shape.B, shape.N_out, shape.D_out), gen, dtype=dtype, device="cuda")
    grad_c = randn((shape.B, shape.N_in, shape.N_out), gen, dtype=dtype, device="cuda")

    def run():
        v, c = capsroute.dynamic_routing(u, weight, 3, bias=bias, leaky=True,
                                         return_coupling=True)
        return [v, c, *torch.autograd.grad([v, c], [u, weight, bias], [grad_v, grad_c])]

    parked = run()
    monkeypatch.setenv("CAPSROUTE_PARK_ROWS", "0")
    for name, a, b in zip(["v", "c", "grad_u", "grad_weight", "grad_bias"], parked, run()):
        assert torch.equal(a, b), name


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("first_sums", ["1", "0"], ids=["one-product", "pass"])
@pytest.mark.parametrize("shape", [CANONICAL, Shape(70, 2403, 20, 8, 16), Shape(9, 300, 64, 24, 16)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_first_sums_cuda(dtype, shape, first_sums, monkeypatch):
    """The forward's first iteration as one matrix product (first_sums_kernel, the default
    where D_in is a multiple of 8) and by the pass it replaces (CAPSROUTE_FIRST_SUMS=0), against
    the reference: the MNIST layer; 70 batch elements (two blocks of rows, one short) over
    many input capsules (several staged chunks a block) and two groups of output capsules; 64
    capsules of 24 input dims (7 blocks of columns, the last one short; chunks of 32 dims that
    end inside a capsule)."""
    monkeypatch.setenv("CAPSROUTE_FIRST_SUMS", first_sums)
    for iterations in (1, 3):
        run_case("dynamic_routing", shape, dtype, "cuda", iterations=iterations, bias=True,
                 leaky=True, detach=False, return_coupling=False)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("cache_mb", ["1024", "0"], ids=["kept", "recomputed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("op", OPS)
def test_groups_over_many_capsules_cuda(op, dtype, cache_mb, monkeypatch):
    """Two groups of output capsules over more input capsules than one wave of pass blocks
    (two per multiprocessor): each group's pass blocks, and its statistics pass's, walk several
    capsules (with the small shapes a pass block gets one capsule)."""
    monkeypatch.setenv("CAPSROUTE_COUPLING_CACHE_MB", cache_mb)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    run_case(op, Shape(9, 6 * sms + 5, 20, 8, 16), dtype, "cuda", iterations=3, bias=True,
             leaky=False, detach=False, return_coupling=True)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("smem_kb", ["163", "99"], ids=["A100-like", "99-KB-like"])
@pytest.mark.parametrize("shape,dtype", [(Shape(128, 1152, 10, 8, 16), torch.float32),
                                         (Shape(64, 1152, 10, 8, 16), torch.float64),
                                         (Shape(16, 300, 20, 8, 32), torch.float32),
                                         (Shape(9, 200, 16, 72, 16), torch.float32)], ids=str)
def test_less_shared_memory_cuda(shape, dtype, smem_kb, monkeypatch):
    """With CAPSROUTE_MAX_SMEM_KB the kernels plan and launch as on a GPU that gives a block
    that much shared memory (163 KB: an A100; 99 KB: compute capability 8.6, 8.9, 12.0), and
    refuse a launch over it: the plans of those GPUs, run on this one, against the reference.
    The MNIST layer's kept last pass and float64's last pass asked more than 99 KB before
    they planned within it (test_cuda_emulation.py's test_less_shared_memory)."""
    monkeypatch.setenv("CAPSROUTE_MAX_SMEM_KB", smem_kb)
    run_case("dynamic_routing", shape, dtype, "cuda", iterations=3, bias=True, leaky=False,
             detach=False, return_coupling=True)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("row_pass,direct,cluster",
                         [("1", "0", "1"), ("1", "1", "1"), ("1", "0", "4"), ("1", "1", "8"),
                          ("0", "0", "1")],
                         ids=["row-passes", "row-passes-direct", "row-passes-clusters-of-4",
                              "row-passes-direct-clusters-of-8", "tile-passes"])
@pytest.mark.parametrize("shape", [CANONICAL, Shape(37, 2403, 7, 6, 13),
                                   Shape(40, 300, 12, 8, 8)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_row_passes_cuda(dtype, shape, row_pass, direct, cluster, monkeypatch):
    """The forward's and the gradient passes of dynamic_routing on row_pass_kernel (16
    batch elements per product; float32's default where a layer is at most 20 column tiles of
    8 dims, asked for in the half types with CAPSROUTE_ROW_PASS=1), the same with the lanes
    reading W[i]'s operands themselves (CAPSROUTE_ROW_DIRECT=1), in float32 also in
    thread-block clusters that add up their partial sums on chip (CAPSROUTE_ROW_CLUSTER; the
    half types run without), and on routing_pass_kernel
    with CAPSROUTE_ROW_PASS=0: all against the reference, on the MNIST
    layer, a layer whose second warp of a pair has 2 of its 5 capsules (13 dims; a batch of
    37 leaves a short row tile; each block walks several input capsules) and 12 capsules of
    8 dims."""
    monkeypatch.setenv("CAPSROUTE_ROW_PASS", row_pass)
    monkeypatch.setenv("CAPSROUTE_ROW_DIRECT", direct)
    monkeypatch.setenv("CAPSROUTE_ROW_CLUSTER", cluster)
    if cluster != "1" and dtype == torch.float32 and torch.cuda.get_device_capability()[0] < 9:
        with pytest.raises(ValueError, match="thread-block clusters"):  # a clear error
            run_case("dynamic_routing", shape, dtype, "cuda", iterations=3, bias=False,
                     leaky=False, detach=False, return_coupling=False)
        return
    run_case("dynamic_routing", shape, dtype, "cuda", iterations=3, bias=True, leaky=True,
             detach=False, return_coupling=True)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("warps", ["", "0", "5"], ids=["default", "capsule-per-block", "5-warps"])
@pytest.mark.parametrize("layer", ["mnist", "groups-wide-in"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_capsule_weight_grad_cuda(dtype, layer, warps, monkeypatch):
    """The backward's kept last pass on weight_grad_capsules_kernel (a block's warps each own
    an input capsule: the default with D_in % 8 == 0 and at least 6 input capsules per
    multiprocessor), on weight_grad_kernel (CAPSROUTE_CAPSULE_GRAD=0) and with 5 warps a block
    asked for: against the reference on the MNIST layer with a short batch tile (B = 37), and
    on two groups of output capsules with two chunks of input dims and a last block with idle
    warps."""
    monkeypatch.setenv("CAPSROUTE_CAPSULE_GRAD", warps)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shape = Shape(37, 1152, 10, 8, 16) if layer == "mnist" else Shape(10, 6 * sms + 3, 20, 16, 16)
    run_case("dynamic_routing", shape, dtype, "cuda", iterations=3, bias=True, leaky=True,
             detach=False, return_coupling=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.5])
@pytest.mark.parametrize("op", OPS)
def test_eps_matches_reference(op, eps, device):
    """eps reaches the squash of every iteration, in the forward and the backward."""
    for dtype in FULL_DTYPES:
        run_case(op, SMALL_SHAPES[0], dtype, device, iterations=3, bias=True, leaky=False,
                 detach=False, return_coupling=True, eps=eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_routing_moves_the_coupling(op, device):
    """The test inputs make routing route: c^(3) is far from uniform and v depends on the
    number of iterations, so a kernel that ignored the logits would fail the comparisons."""
    shape = SMALL_SHAPES[0]
    gen = make_generator("moves", op)
    if op == "dynamic_routing":
        args = make_routing_inputs(shape, torch.float64, device, bias=False, gen=gen)[:2]
    else:
        args = make_route_inputs(shape, torch.float64, device, bias=False, gen=gen)[:1]
    fn = getattr(capsroute, op)
    v1, c1 = fn(*args, 1, return_coupling=True)
    v3, c3 = fn(*args, 3, return_coupling=True)
    assert torch.allclose(c1, torch.full_like(c1, 1 / shape.N_out))
    assert (c3 - 1 / shape.N_out).abs().max() > 0.1
    assert rel_err(v3, v1) > 0.05
    # squash is neither saturated nor linear at these scales
    norms = v3.norm(dim=-1)
    assert 0.05 < norms.mean() < 0.95


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("used", ["v", "c"])
@pytest.mark.parametrize("op", OPS)
def test_gradient_of_one_output(op, used, device):
    """With return_coupling, a loss that uses only v, or only c: the other output's gradient
    reaches the backward as None (autograd does not materialise zeros for it) and counts as
    zero. float64 against the reference."""
    shape = SMALL_SHAPES[0]
    gen = make_generator("one-output", op, used)
    if op == "dynamic_routing":
        inputs = make_routing_inputs(shape, torch.float64, device, bias=True, gen=gen)
    else:
        inputs = make_route_inputs(shape, torch.float64, device, bias=True, gen=gen)
    leaves = [t.detach().requires_grad_() for t in inputs]
    refs = [as_reference(t).requires_grad_() for t in inputs]
    v, c = getattr(capsroute, op)(*leaves[:-1], 3, bias=leaves[-1], return_coupling=True)
    v_ref, c_ref = getattr(reference, op)(*refs[:-1], 3, bias=refs[-1], return_coupling=True)
    out, out_ref = (v, v_ref) if used == "v" else (c, c_ref)
    g = randn(out.shape, gen, dtype=torch.float64, device=device)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    grads_ref = torch.autograd.grad(out_ref, refs, as_reference(g), allow_unused=True)
    for name, gr, gr_ref in zip(["input", "bias"] if op == "route" else ["u", "weight", "bias"],
                                grads, grads_ref):
        if gr_ref is None:  # the output does not depend on this input
            assert gr is None or torch.count_nonzero(gr) == 0, name
            continue
        assert_close_rel(gr, gr_ref, GRAD_TOL[torch.float64], f"grad {name}")


# --- gradcheck (float64) ------------------------------------------------------------------

GRADCHECK_SHAPE = Shape(2, 3, 3, 2, 3)


def _gradcheck(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("return_coupling", [False, True], ids=["v", "v_and_c"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("leaky", [False, True], ids=["softmax", "leaky"])
@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op, iterations, leaky, bias, return_coupling, device):
    """The exact gradient (detach=False) for u, weight, bias and u_hat, through v and, with
    return_coupling, through c as well."""
    gen = make_generator("gradcheck", op, iterations, leaky, bias, return_coupling)
    if op == "dynamic_routing":
        inputs = make_routing_inputs(GRADCHECK_SHAPE, torch.float64, device, bias=bias,
                                     gen=gen, requires_grad=True)

        def fn(u, weight, *b):
            return capsroute.dynamic_routing(u, weight, iterations, bias=b[0] if b else None,
                                             leaky=leaky, return_coupling=return_coupling)
    else:
        inputs = make_route_inputs(GRADCHECK_SHAPE, torch.float64, device, bias=bias,
                                   gen=gen, requires_grad=True)

        def fn(u_hat, *b):
            return capsroute.route(u_hat, iterations, bias=b[0] if b else None, leaky=leaky,
                                   return_coupling=return_coupling)
    _gradcheck(fn, tuple(t for t in inputs if t is not None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("leaky", [False, True], ids=["softmax", "leaky"])
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_detach_one_iteration(op, leaky, bias, device):
    """With one iteration detach=True changes nothing, so its gradient is the exact one."""
    gen = make_generator("gradcheck-detach", op, leaky, bias)
    if op == "dynamic_routing":
        inputs = make_routing_inputs(GRADCHECK_SHAPE, torch.float64, device, bias=bias,
                                     gen=gen, requires_grad=True)

        def fn(u, weight, *b):
            return capsroute.dynamic_routing(u, weight, 1, bias=b[0] if b else None,
                                             leaky=leaky, detach=True)
    else:
        inputs = make_route_inputs(GRADCHECK_SHAPE, torch.float64, device, bias=bias,
                                   gen=gen, requires_grad=True)

        def fn(u_hat, *b):
            return capsroute.route(u_hat, 1, bias=b[0] if b else None, leaky=leaky,
                                   detach=True)
    _gradcheck(fn, tuple(t for t in inputs if t is not None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("leaky", [False, True], ids=["softmax", "leaky"])
@pytest.mark.parametrize("iterations", [2, 3, 5])
@pytest.mark.parametrize("op", OPS)
def test_detach_gradient_is_that_of_the_last_iteration(op, iterations, leaky, bias, device):
    """detach=True (DESIGN.md section 1): the gradient is that of
    squash(sum_i c_ij u_hat_ij + bias_j) with c = c^(r) held constant. Checked against autograd
    of that expression (gradcheck-verified), built from the op's own c^(r), independently of
    the reference's routing loop; the exact gradient differs from it."""
    shape = GRADCHECK_SHAPE
    gen = make_generator("detach", op, iterations, leaky, bias)
    if op == "dynamic_routing":
        inputs = make_routing_inputs(shape, torch.float64, device, bias=bias, gen=gen,
                                     requires_grad=True)
        args, b = inputs[:2], inputs.bias

        def predictions(u, weight):
            return reference.predictions(u, weight)
    else:
        inputs = make_route_inputs(shape, torch.float64, device, bias=bias, gen=gen,
                                   requires_grad=True)
        args, b = inputs[:1], inputs.bias

        def predictions(u_hat):
            return u_hat
    fn = getattr(capsroute, op)
    v, c = fn(*args, iterations, bias=b, leaky=leaky, detach=True, return_coupling=True)
    assert not c.requires_grad

    def last_iteration(*xs):
        n = len(args)
        s = (c.unsqueeze(-1) * predictions(*xs[:n])).sum(dim=1)
        if len(xs) > n:
            s = s + xs[n]
        return reference.squash(s)

    leaves = tuple(t for t in inputs if t is not None)
    _gradcheck(last_iteration, leaves)
    expected = last_iteration(*leaves)
    assert_close_rel(v, expected, 1e-12, "v")
    g = randn(v.shape, gen, device=device)
    got = torch.autograd.grad(v, leaves, g)
    want = torch.autograd.grad(expected, leaves, g)
    exact = torch.autograd.grad(fn(*args, iterations, bias=b, leaky=leaky, detach=False),
                                leaves, g)
    for x, y, z in zip(got, want, exact):
        assert_close_rel(x, y, 1e-10, "detached gradient")
        assert rel_err(z, y) > 1e-4, "the test case does not tell detach from exact"


# --- gradients of gradients, forward-mode AD and torch.func --------------------------------
# The backward ops are not differentiable and the kernels have no forward-mode or functorch
# rules: there capsroute runs the reference (capsroute/_ops.py, _gradient_graph and
# _register_autograd; functional.py, _under_func_grad). Before, double backward and jvp gave
# zeros, forward-mode AD through torch.ops.capsroute dropped the tangents, and
# torch.func.grad failed.


def _inputs_and_fns(op, device, *, bias, leaky=False, detach=False, return_coupling=False,
                    key=()):
    """float64 leaves of GRADCHECK_SHAPE, and the op and the reference as functions of them."""
    gen = make_generator("transforms", op, bias, leaky, detach, return_coupling, *key)
    make = make_routing_inputs if op == "dynamic_routing" else make_route_inputs
    inputs = tuple(t for t in make(GRADCHECK_SHAPE, torch.float64, device, bias=bias, gen=gen,
                                   requires_grad=True) if t is not None)
    n = 2 if op == "dynamic_routing" else 1

    def of(lib):
        def fn(*xs):
            return getattr(lib, op)(*xs[:n], 2, bias=xs[n] if bias else None, leaky=leaky,
                                    detach=detach, return_coupling=return_coupling)
        return fn

    return inputs, of(capsroute), of(reference)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("return_coupling", [False, True], ids=["v", "v_and_c"])
@pytest.mark.parametrize("leaky", [False, True], ids=["softmax", "leaky"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("op", OPS)
def test_gradgradcheck(op, bias, leaky, return_coupling, device):
    """Second derivatives against finite differences of the first (float64). Not with
    detach=True, whose gradient holds c^(r) constant: it is no function's derivative, and
    finite differences of it move c^(r) (test_gradient_penalty_matches_reference covers it)."""
    inputs, fn, _ = _inputs_and_fns(op, device, bias=bias, leaky=leaky,
                                    return_coupling=return_coupling)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("detach", [False, True], ids=["exact", "detach"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("op", OPS)
def test_gradient_penalty_matches_reference(op, bias, detach, device):
    """A gradient penalty: |dL/dx|^2 differentiated again. Its first-order gradients, taken
    with create_graph=True, are the kernels' (to rounding), and its gradients the
    reference's."""
    inputs, fn, ref = _inputs_and_fns(op, device, bias=bias, detach=detach, key=("penalty",))
    r = randn(fn(*inputs).shape, make_generator("penalty-r", op), device=device)

    def penalty(f):
        grads = torch.autograd.grad((f(*inputs) * r).sum(), inputs, create_graph=True)
        return grads, sum((g * g).sum() for g in grads)

    grads, p = penalty(fn)
    grads_ref, p_ref = penalty(ref)
    kernels = torch.autograd.grad((fn(*inputs) * r).sum(), inputs)
    for g, g_ref, k in zip(grads, grads_ref, kernels):
        assert_close_rel(g, g_ref, 1e-12, "first-order gradient")
        assert_close_rel(g, k, 1e-12, "first-order gradient against the kernels'")
    for g, g_ref in zip(torch.autograd.grad(p, inputs), torch.autograd.grad(p_ref, inputs)):
        assert_close_rel(g, g_ref, 1e-12, "gradient of the penalty")


def _raw_op(op, *, return_coupling):
    """torch.ops.capsroute.<op> as a function of _inputs_and_fns's leaves (with bias), giving
    what the function gives: v, or (v, c)."""
    n = 2 if op == "dynamic_routing" else 1

    def fn(*xs):
        v, c, _ = getattr(torch.ops.capsroute, op)(*xs[:n], xs[n], 2, False, False, 1e-8,
                                                  return_coupling)
        return (v, c) if return_coupling else v
    return fn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api", ["function", "raw_op"])
@pytest.mark.parametrize("return_coupling", [False, True], ids=["v", "v_and_c"])
@pytest.mark.parametrize("op", OPS)
def test_forward_mode_matches_reference(op, return_coupling, api, device):
    """torch.autograd.forward_ad and torch.func.jvp, through capsroute's functions and through
    torch.ops.capsroute: the tangents of v (and c) are the reference's (float64)."""
    import torch.autograd.forward_ad as fwAD

    inputs, fn, ref = _inputs_and_fns(op, device, bias=True, return_coupling=return_coupling)
    if api == "raw_op":
        fn = _raw_op(op, return_coupling=return_coupling)
    primals = tuple(t.detach() for t in inputs)
    gen = make_generator("tangents", op, return_coupling)
    tangents = tuple(randn(t.shape, gen, device=device) for t in primals)
    outs = lambda o: o if return_coupling else (o,)  # noqa: E731
    with fwAD.dual_level():
        got = [fwAD.unpack_dual(o) for o in outs(fn(*map(fwAD.make_dual, primals, tangents)))]
    want = torch.func.jvp(ref, primals, tangents)
    jvp = torch.func.jvp(fn, primals, tangents)
    for k, (value, tangent, value_ref, tangent_ref) in enumerate(zip(
            [g.primal for g in got], [g.tangent for g in got], outs(want[0]), outs(want[1]))):
        assert_close_rel(value, value_ref, 1e-12, f"output {k}")
        assert_close_rel(tangent, tangent_ref, 1e-12, f"forward_ad tangent {k}")
        assert_close_rel(outs(jvp[1])[k], tangent_ref, 1e-12, f"jvp tangent {k}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_torch_func_matches_reference(op, device):
    """torch.func.grad, jacrev and jacfwd give the reference's derivatives, and vmap over
    examples the op's own values, example by example (float64)."""
    inputs, fn, ref = _inputs_and_fns(op, device, bias=True)
    primals = tuple(t.detach() for t in inputs)
    r = randn(fn(*primals).shape, make_generator("func-r", op), device=device)
    argnums = tuple(range(len(primals)))
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        for got, want in zip(transform(fn, argnums)(*primals), transform(ref, argnums)(*primals)):
            assert_close_rel(got, want, 1e-12, transform.__name__)
    loss = lambda f: lambda *xs: (f(*xs) * r).sum()  # noqa: E731
    for got, want in zip(torch.func.grad(loss(fn), argnums)(*primals),
                         torch.func.grad(loss(ref), argnums)(*primals)):
        assert_close_rel(got, want, 1e-12, "grad")
    # vmap over a leading dim of examples, each a batch of its own; the weights are shared.
    batched = (torch.stack([primals[0], primals[0].flip(0)]),) + primals[1:]
    in_dims = (0,) + (None,) * (len(primals) - 1)
    got = torch.func.vmap(fn, in_dims)(*batched)
    for k in range(2):
        assert_close_rel(got[k], fn(batched[0][k], *primals[1:]), 1e-14, "vmap")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_transforms_in_half_types(op, device):
    """bfloat16: jvp's tangents and a gradient penalty's gradients are the float32
    reference's, to bfloat16 precision, and in bfloat16, as the op's outputs and gradients are
    (the reference runs in float32, as the kernels accumulate)."""
    inputs, fn, ref = _inputs_and_fns(op, device, bias=True, key=("bf16",))
    low = tuple(t.detach().bfloat16().requires_grad_() for t in inputs)
    high = tuple(t.detach().float().requires_grad_() for t in low)
    tangents = tuple(torch.ones_like(t) for t in low)
    value, tangent = torch.func.jvp(fn, tuple(t.detach() for t in low), tangents)
    value_ref, tangent_ref = torch.func.jvp(ref, tuple(t.detach() for t in high),
                                            tuple(t.float() for t in tangents))
    assert value.dtype == tangent.dtype == torch.bfloat16
    assert_close_rel(tangent, tangent_ref, 1e-2, "jvp tangent")

    def penalty(f, xs):
        grads = torch.autograd.grad(f(*xs).float().square().sum(), xs, create_graph=True)
        assert all(g.dtype == x.dtype for g, x in zip(grads, xs))
        return torch.autograd.grad(sum(g.float().square().sum() for g in grads), xs)

    for got, want in zip(penalty(fn, low), penalty(ref, high)):
        assert got.dtype == torch.bfloat16
        assert_close_rel(got, want, 3e-2, "gradient of the penalty")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_plain_calls_run_the_kernels(op, device, monkeypatch):
    """Forward, backward (create_graph=False), no_grad and vmap calls never reach the
    reference: it is the way around a transform, not a path a training step takes."""
    inputs, fn, _ = _inputs_and_fns(op, device, bias=True, return_coupling=True)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(reference, op, refuse)
    v, c = fn(*inputs)
    torch.autograd.grad((v.sum(), c.sum()), inputs)
    with torch.no_grad():
        fn(*inputs)
    torch.func.vmap(lambda x: fn(x, *inputs[1:])[0])(inputs[0].detach()[None])


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_functions_and_raw_ops_agree(op, device):
    """capsroute's functions reach the ops' autograd.Function without the dispatcher's trip
    through the Python Autograd kernel where nothing needs it (capsroute/_ops.py, _plain), and
    through torch.ops otherwise. Both ways give the same bits, with grad and without; a
    torch.jit.trace, which records what goes through the dispatcher, records the op itself (a
    trace of the autograd.Function would differ from call to call and fail its check) and its
    gradients are the function's."""
    inputs, fn, _ = _inputs_and_fns(op, device, bias=True, return_coupling=True)
    raw = _raw_op(op, return_coupling=True)
    outs = fn(*inputs)
    raw_outs = raw(*inputs)
    r = [randn(t.shape, make_generator("agree", op, k), device=device) for k, t in
         enumerate(outs)]
    grads = torch.autograd.grad(outs, inputs, r)
    raw_grads = torch.autograd.grad(raw_outs, inputs, r)
    with torch.no_grad():
        no_grad = fn(*inputs)
    for a, b in zip((*outs, *grads, *no_grad), (*raw_outs, *raw_grads, *outs)):
        assert torch.equal(a, b)

    traced = torch.jit.trace(fn, inputs)
    assert f"capsroute::{op}" in {node.kind() for node in traced.graph.nodes()}
    traced_outs = traced(*inputs)
    for a, b in zip((*traced_outs, *torch.autograd.grad(traced_outs, inputs, r)),
                    (*outs, *grads)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("op", OPS)
def test_backward_converts_nothing(op, dtype, device):
    """The backward of a training step issues no conversion or copy: the kernels read grad_v
    in the dtype autograd hands it over in (v's) and, with one group of output capsules, write
    grad_u in its own. Before, a bfloat16 or float16 backward converted grad_v to float32 and,
    on CUDA, grad_u back from it: two more operations for the host per step. The gradients
    are checked against the float64 reference too."""
    gen = make_generator("converts-nothing", op, str(dtype))
    make = make_routing_inputs if op == "dynamic_routing" else make_route_inputs
    inputs = [t for t in make(Shape(5, 12, 10, 8, 16), dtype, device, bias=False, gen=gen,
                              requires_grad=True) if t is not None]
    v = getattr(capsroute, op)(*inputs)
    grad_v = randn(v.shape, gen, dtype=dtype, device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        grads = torch.autograd.grad(v, inputs, grad_v)
    names = {event.name for event in prof.events()}
    assert f"capsroute::{op}_backward" in names
    assert not names & COPY_OPS, f"the backward ran {sorted(names & COPY_OPS)}"
    refs = [as_reference(t).requires_grad_() for t in inputs]
    ref_grads = torch.autograd.grad(getattr(reference, op)(*refs), refs, as_reference(grad_v))
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == dtype
        assert_close_rel(grad, ref, GRAD_TOL[dtype], f"{op} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_backward_op_converts_grad_v_to_the_inputs_dtype(op, device):
    """The raw backward op takes grad_v in any floating dtype and reads it as the inputs'
    dtype, as autograd would have handed it over."""
    gen = make_generator("grad-v-dtype", op)
    make = make_routing_inputs if op == "dynamic_routing" else make_route_inputs
    inputs = [t for t in make(Shape(3, 7, 5, 3, 4), torch.bfloat16, device, bias=False,
                              gen=gen) if t is not None]
    _, _, s = getattr(torch.ops.capsroute, op)(*inputs, None, 3, False, False, 1e-8, False)
    grad_v = randn((3, 5, 4), gen, dtype=torch.float32, device=device)
    backward = getattr(torch.ops.capsroute, op + "_backward")
    wide = backward(grad_v, None, *inputs, s, False, 3, False, False, 1e-8)
    narrow = backward(grad_v.to(torch.bfloat16), None, *inputs, s, False, 3, False, False, 1e-8)
    for a, b in zip(wide, narrow):
        assert a.dtype == b.dtype and torch.equal(a, b)


# --- torch.library.opcheck -----------------------------------------------------------------

OPCHECK_SHAPE = Shape(3, 7, 5, 3, 4)
# (dtype, bias, leaky, detach, return_coupling, iterations)
OPCHECK_CONFIGS = [
    pytest.param(torch.float32, False, False, False, False, 3, id="f32-plain"),
    pytest.param(torch.float32, True, True, False, True, 2, id="f32-bias-leaky-coupling"),
    pytest.param(torch.float64, True, False, True, True, 3, id="f64-bias-detach-coupling"),
    pytest.param(torch.bfloat16, True, True, False, False, 1, id="bf16-bias-leaky-it1"),
]


def _opcheck(op, args):
    # Raises with the failing check's details when one fails.
    torch.library.opcheck(op, args, raise_exception=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,bias,leaky,detach,return_coupling,iterations",
                         OPCHECK_CONFIGS)
def test_opcheck_forward_and_backward_ops(dtype, bias, leaky, detach, return_coupling,
                                          iterations, device):
    """schema, fake kernels, autograd registration and AOT dispatch of all four ops."""
    gen = make_generator("opcheck", str(dtype), bias, leaky, detach, return_coupling)
    x = make_routing_inputs(OPCHECK_SHAPE, dtype, device, bias=bias, gen=gen,
                            requires_grad=True)
    _opcheck(torch.ops.capsroute.dynamic_routing.default,
             (x.u, x.weight, x.bias, iterations, leaky, detach, 1e-8, return_coupling))
    y = make_route_inputs(OPCHECK_SHAPE, dtype, device, bias=bias, gen=gen,
                          requires_grad=True)
    _opcheck(torch.ops.capsroute.route.default,
             (y.u_hat, y.bias, iterations, leaky, detach, 1e-8, return_coupling))

    # The backward ops, with what the forward saves and realistic incoming gradients.
    B, N_in, N_out, _, D_out = OPCHECK_SHAPE
    with torch.no_grad():
        _, c, s = torch.ops.capsroute.dynamic_routing(
            x.u, x.weight, x.bias, iterations, leaky, detach, 1e-8, return_coupling)
        grad_v = randn((B, N_out, D_out), gen, dtype=dtype, device=device)
        grad_c = (randn((B, N_in, N_out), gen, dtype=dtype, device=device)
                  if return_coupling and not detach else None)
        _opcheck(torch.ops.capsroute.dynamic_routing_backward.default,
                 (grad_v, grad_c, x.u.detach(), x.weight.detach(), s, bias, iterations, leaky,
                  detach, 1e-8))
        _, c, s = torch.ops.capsroute.route(y.u_hat, y.bias, iterations, leaky, detach, 1e-8,
                                            return_coupling)
        _opcheck(torch.ops.capsroute.route_backward.default,
                 (grad_v, grad_c, y.u_hat.detach(), s, bias, iterations, leaky, detach, 1e-8))


# --- torch.compile -------------------------------------------------------------------------


def _model_with(lib):
    """A function mixing both ops with ordinary torch ops, as a CapsNet would; `lib` is
    capsroute or its reference."""

    def model(u, weight, bias, u_hat):
        v1, c1 = lib.dynamic_routing(u, weight, 3, bias=bias, leaky=True,
                                     return_coupling=True)
        v2 = lib.route(u_hat, 2, bias=bias, detach=True)
        return v1 * v2, c1

    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_matches_eager(dynamic, device):
    """Forward and backward of a compiled function (fullgraph: no graph break around the
    ops) equal eager mode; with dynamic=True one graph serves two batch sizes."""
    torch._dynamo.reset()
    model = _model_with(capsroute)
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    for B in (2, 6) if dynamic else (2,):
        shape = Shape(B, 7, 5, 3, 4)
        gen = make_generator("compile", B, dynamic)
        x = make_routing_inputs(shape, torch.float32, device, bias=True, gen=gen,
                                requires_grad=True)
        u_hat = make_route_inputs(shape, torch.float32, device, bias=False, gen=gen,
                                  requires_grad=True).u_hat
        leaves = (x.u, x.weight, x.bias, u_hat)
        eager = model(*leaves)
        # the second batch size must reuse the dynamic graph
        with torch._dynamo.config.patch(error_on_recompile=dynamic and B != 2):
            got = compiled(*leaves)
        grads_out = [randn(t.shape, gen, dtype=t.dtype, device=device) for t in eager]
        for e, g in zip(eager, got):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
        want = torch.autograd.grad(eager, leaves, grads_out)
        have = torch.autograd.grad(got, leaves, grads_out)
        for name, e, g in zip(("u", "weight", "bias", "u_hat"), want, have):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"grad {name}")
        # and both against the reference
        ref_leaves = [as_reference(t) for t in leaves]
        ref = _model_with(reference)(*ref_leaves)
        ref_grads = torch.autograd.grad(ref, ref_leaves, [as_reference(g) for g in grads_out])
        for g, r in zip(got, ref):
            assert_close_rel(g, r, TOL[torch.float32], "compiled output")
        for g, r in zip(have, ref_grads):
            assert_close_rel(g, r, GRAD_TOL[torch.float32], "compiled gradient")


# --- autocast ------------------------------------------------------------------------------

AUTOCAST_CASES = [pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16")]
if "cuda" in DEVICES:
    AUTOCAST_CASES += [pytest.param("cuda", torch.float16, id="cuda-float16"),
                       pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16")]


@pytest.mark.parametrize("device,amp_dtype", AUTOCAST_CASES)
@pytest.mark.parametrize("op", OPS)
def test_autocast(op, device, amp_dtype):
    """Under autocast float32 inputs are computed in the autocast dtype (the op is
    matmul-like), and the gradients come back in float32."""
    shape = SMALL_SHAPES[0]
    gen = make_generator("autocast", op, str(amp_dtype))
    if op == "dynamic_routing":
        inputs = make_routing_inputs(shape, torch.float32, device, bias=True, gen=gen,
                                     requires_grad=True)
    else:
        inputs = make_route_inputs(shape, torch.float32, device, bias=True, gen=gen,
                                   requires_grad=True)
    fn, ref_fn = getattr(capsroute, op), getattr(reference, op)
    with torch.autocast(device, dtype=amp_dtype):
        v, c = fn(*inputs[:-1], 3, bias=inputs.bias, return_coupling=True)
    assert v.dtype == amp_dtype and c.dtype == amp_dtype
    # the reference on the inputs as autocast rounds them (float64, on the CPU)
    rounded = [as_reference(t.detach().to(amp_dtype)).requires_grad_() for t in inputs]
    v_ref, c_ref = ref_fn(*rounded[:-1], 3, bias=rounded[-1], return_coupling=True)
    assert_close_rel(v, v_ref, TOL[amp_dtype], "v")
    assert_close_rel(c, c_ref, TOL[amp_dtype], "c")
    g = randn(v.shape, gen, dtype=amp_dtype, device=device)
    grads = torch.autograd.grad(v, list(inputs), g)
    ref_grads = torch.autograd.grad(v_ref, rounded, as_reference(g))
    for t, gr, rg in zip(inputs, grads, ref_grads):
        assert gr.dtype == torch.float32 and gr.shape == t.shape
        assert_close_rel(gr, rg, GRAD_TOL[amp_dtype], "grad")


@pytest.mark.parametrize("op", OPS)
def test_autocast_leaves_float64_alone(op):
    """As for PyTorch's own ops, autocast does not lower float64 inputs."""
    shape = SMALL_SHAPES[0]
    gen = make_generator("autocast64", op)
    if op == "dynamic_routing":
        inputs = make_routing_inputs(shape, torch.float64, "cpu", bias=True, gen=gen)
    else:
        inputs = make_route_inputs(shape, torch.float64, "cpu", bias=True, gen=gen)
    fn = getattr(capsroute, op)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = fn(*inputs[:-1], 3, bias=inputs.bias)
    assert v.dtype == torch.float64
    assert torch.equal(v, fn(*inputs[:-1], 3, bias=inputs.bias))


# --- squash --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dim", [-1, 0, 1])
@pytest.mark.parametrize("eps", [1e-8, 0.0, 0.25])
def test_squash(eps, dim, dtype, device):
    gen = make_generator("squash", eps, dim, str(dtype))
    s = randn((4, 5, 6), gen, dtype=dtype, device=device, scale=0.7)
    v = capsroute.squash(s, dim=dim, eps=eps)
    assert v.dtype == dtype and v.shape == s.shape
    # the formula of DESIGN.md section 1, written out independently in float64
    s64 = s.double().cpu()
    n2 = (s64 ** 2).sum(dim=dim, keepdim=True)
    want = n2 / (1 + n2) * s64 / torch.sqrt(n2 + eps)
    assert_close_rel(v, want, TOL[dtype], "squash")
    assert torch.equal(v, reference.squash(s, dim=dim, eps=eps))
    # |v| < 1 and v points along s
    norms = v.double().norm(dim=dim)
    assert (norms < 1).all()
    cos = (v.double() * s.double()).sum(dim=dim) / (norms * s.double().norm(dim=dim))
    assert (cos > 1 - 1e-2).all()


def test_squash_known_values():
    s = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    v = capsroute.squash(s, eps=1e-8)
    # |s|^2 = 25: v = 25/26 * s / sqrt(25 + 1e-8)
    expected = torch.tensor([[3.0, 4.0]], dtype=torch.float64) * 25 / 26 / (25 + 1e-8) ** 0.5
    torch.testing.assert_close(v[:1], expected, rtol=1e-14, atol=0)
    assert torch.equal(v[1], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_squash_gradient_finite_at_zero(eps):
    s = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    v = capsroute.squash(s, eps=eps)
    (g,) = torch.autograd.grad(v.sum(), s)
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    s = torch.randn(3, 4, dtype=torch.float64, generator=make_generator("sq")).requires_grad_()
    assert gradcheck(lambda x: capsroute.squash(x, eps=eps), (s,))


@pytest.mark.parametrize("eps,exc,match", [
    (-1e-3, ValueError, r"eps.*-0\.001"),
    (float("nan"), ValueError, r"eps.*nan"),
    (float("inf"), ValueError, r"eps.*inf"),
    ("1e-8", TypeError, r"eps.*str"),
    (None, TypeError, r"eps.*NoneType"),
])
def test_squash_bad_eps(eps, exc, match):
    with pytest.raises(exc, match=match):
        capsroute.squash(torch.randn(2, 3), eps=eps)


# --- empty batch ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("detach", [False, True], ids=["exact", "detach"])
@pytest.mark.parametrize("op", OPS)
def test_empty_batch(op, detach, dtype, device):
    """B = 0: empty outputs of the right shapes, an empty gradient for the batch-shaped
    inputs and zero gradients for weight and bias (a sum over no batch elements)."""
    shape = Shape(0, 7, 5, 3, 4)
    gen = make_generator("empty", op, str(dtype))
    if op == "dynamic_routing":
        inputs = make_routing_inputs(shape, dtype, device, bias=True, gen=gen,
                                     requires_grad=True)
    else:
        inputs = make_route_inputs(shape, dtype, device, bias=True, gen=gen,
                                   requires_grad=True)
    fn = getattr(capsroute, op)
    v, c = fn(*inputs[:-1], 3, bias=inputs.bias, detach=detach, return_coupling=True)
    assert v.shape == (0, 5, 4) and c.shape == (0, 7, 5)
    assert v.dtype == dtype and c.dtype == dtype
    outs = [v] + ([c] if c.requires_grad else [])
    grads = torch.autograd.grad(outs, list(inputs), [torch.zeros_like(o) for o in outs])
    for t, g in zip(inputs, grads):
        assert g.shape == t.shape and g.dtype == dtype
        assert torch.equal(g, torch.zeros_like(t))
    # and through the reference, the same
    ref = [as_reference(t) for t in inputs]
    v_ref = getattr(reference, op)(*ref[:-1], 3, bias=ref[-1], detach=detach)
    assert v_ref.shape == v.shape


# --- strided inputs ------------------------------------------------------------------------


def _strided_copy(t: torch.Tensor, perm) -> torch.Tensor:
    """The same values as t, in a tensor whose memory is laid out in the order `perm`
    (a non-contiguous view)."""
    inverse = [perm.index(d) for d in range(t.dim())]
    return t.permute(perm).contiguous().permute(inverse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_non_contiguous_inputs_dynamic_routing(dtype, device):
    shape = SMALL_SHAPES[0]
    gen = make_generator("strided-dr", str(dtype))
    x = make_routing_inputs(shape, dtype, device, bias=True, gen=gen)
    # u: transposed; weight: reversed memory order; bias: transposed; u also as a slice
    big = randn((shape.B, shape.N_in * 2, shape.D_in + 3), gen, dtype=dtype, device=device)
    big[:, ::2, 1:-2] = x.u
    variants = {
        "transposed": (_strided_copy(x.u, [0, 2, 1]), _strided_copy(x.weight, [3, 2, 1, 0]),
                       _strided_copy(x.bias, [1, 0])),
        "sliced": (big[:, ::2, 1:-2], _strided_copy(x.weight, [1, 0, 3, 2]), x.bias),
    }
    g = randn((shape.B, shape.N_out, shape.D_out), gen, dtype=dtype, device=device)
    gc = randn((shape.B, shape.N_in, shape.N_out), gen, dtype=dtype, device=device)

    def run(u, weight, bias):
        # detach() keeps the strides: the leaves are as strided as the arguments
        leaves = [t.detach().requires_grad_() for t in (u, weight, bias)]
        v, c = capsroute.dynamic_routing(*leaves[:2], 3, bias=leaves[2], leaky=True,
                                         return_coupling=True)
        return (v, c) + torch.autograd.grad([v, c], leaves, [g, gc])

    want = run(*(t.clone() for t in x))
    for name, args in variants.items():
        assert not all(a.is_contiguous() for a in args)
        have = run(*args)
        for w, h in zip(want, have):
            assert torch.equal(w, h), f"{name}: a strided input changes the result"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_non_contiguous_inputs_route(dtype, device):
    shape = SMALL_SHAPES[0]
    gen = make_generator("strided-route", str(dtype))
    x = make_route_inputs(shape, dtype, device, bias=True, gen=gen)
    B, N_in, N_out, _, D_out = shape
    big = randn((B, N_in, N_out, 2 * D_out), gen, dtype=dtype, device=device)
    big[..., ::2] = x.u_hat
    variants = {
        "sliced": (big[..., ::2], x.bias),
        "permuted": (_strided_copy(x.u_hat, [2, 3, 0, 1]), _strided_copy(x.bias, [1, 0])),
        "expanded": (x.u_hat[:1].expand(B, -1, -1, -1), x.bias),  # stride 0 along B
    }
    g = randn((B, N_out, D_out), gen, dtype=dtype, device=device)
    gc = randn((B, N_in, N_out), gen, dtype=dtype, device=device)

    def run(u_hat, bias):
        leaves = [t.detach().requires_grad_() for t in (u_hat, bias)]
        v, c = capsroute.route(leaves[0], 2, bias=leaves[1], return_coupling=True)
        return (v, c) + torch.autograd.grad([v, c], leaves, [g, gc])

    for name, (u_hat, bias) in variants.items():
        assert not u_hat.is_contiguous()
        want = run(u_hat.contiguous(), bias.contiguous())
        have = run(u_hat, bias)
        for w, h in zip(want, have):
            assert torch.equal(w, h), f"{name}: a strided input changes the result"


@pytest.mark.parametrize("device", DEVICES)
def test_route_saves_strided_predictions_contiguous(device):
    """A strided u_hat is copied once, before the op, and autograd saves the copy: the backward
    then reads it as it is instead of copying the view again. An expanded u_hat (a zero
    stride) is saved as the view, whose copy would hold B times the memory."""
    shape = SMALL_SHAPES[0]
    x = make_route_inputs(shape, torch.float32, device, bias=False,
                          gen=make_generator("saved-strided-route"))
    B = shape.B
    cases = {
        "transposed": (_strided_copy(x.u_hat, [0, 2, 1, 3]), True),  # CapsNet-Keras's layout
        "sliced": (torch.cat([x.u_hat, x.u_hat], dim=-1)[..., ::2], True),
        "expanded": (x.u_hat[:1].expand(B, -1, -1, -1), False),
    }
    for name, (u_hat, contiguous) in cases.items():
        saved = []

        def pack(t):
            if t.shape == u_hat.shape:
                saved.append(t)
            return t

        leaf = u_hat.detach().requires_grad_()  # (detach keeps the strides)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            capsroute.route(leaf, 2)
        assert len(saved) == 1, name
        if contiguous:
            assert saved[0].is_contiguous(), f"{name}: the strided view was saved"
        else:
            assert saved[0].stride() == u_hat.stride(), f"{name}: the expanded view was copied"


# --- nothing is written into the caller's tensors ------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("detach", [False, True], ids=["exact", "detach"])
@pytest.mark.parametrize("op", OPS)
def test_inputs_are_not_modified(op, detach, dtype, device):
    """Forward and backward leave every input (and the whole storage of a view input) and
    the incoming gradients untouched."""
    shape = SMALL_SHAPES[0]
    gen = make_generator("inputs", op, detach, str(dtype))
    B, N_in, N_out, D_in, D_out = shape
    if op == "dynamic_routing":
        base_u = randn((B + 1, N_in, D_in + 2), gen, dtype=dtype, device=device)
        base_w = randn((N_in, N_out, D_out, D_in), gen, dtype=dtype, device=device, scale=0.3)
        bases = [base_u, base_w]
    else:
        bases = [randn((B, N_in, N_out, D_out + 1), gen, dtype=dtype, device=device,
                       scale=0.4)]
    bases.append(randn((N_out + 1, D_out), gen, dtype=dtype, device=device))
    for b in bases:
        b.requires_grad_()
    snapshots = [b.detach().clone() for b in bases]
    # u, u_hat and bias are views into bigger tensors
    if op == "dynamic_routing":
        args = [bases[0][1:, :, 1:-1], bases[1]]
    else:
        args = [bases[0][..., :-1]]
    bias = bases[-1][1:]
    v, c = getattr(capsroute, op)(*args, 3, bias=bias, detach=detach, return_coupling=True)
    g_v = randn(v.shape, gen, dtype=dtype, device=device)
    g_c = randn(c.shape, gen, dtype=dtype, device=device)
    g_snap = [g_v.clone(), g_c.clone()]
    outs, gs = ([v, c], [g_v, g_c]) if c.requires_grad else ([v], [g_v])
    torch.autograd.backward(outs, gs)
    for b, snap in zip(bases, snapshots):
        assert torch.equal(b.detach(), snap), "an input was written to"
        assert b.grad is not None and torch.isfinite(b.grad).all()
    assert torch.equal(g_v, g_snap[0]) and torch.equal(g_c, g_snap[1]), \
        "an incoming gradient was written to"


# --- zero vectors --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("zeros", ["some", "all"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("op", OPS)
def test_zero_vectors(op, bias, zeros, dtype, device):
    """Zero input capsules (u[b, i] = 0 or u_hat[b, i, j] = 0), some or all of them: finite
    outputs and gradients for eps > 0, equal to the reference's."""
    shape = SMALL_SHAPES[0]
    gen = make_generator("zeros", op, bias, zeros, str(dtype))
    if op == "dynamic_routing":
        inputs = make_routing_inputs(shape, dtype, device, bias=bias, gen=gen)
        x = inputs.u
    else:
        inputs = make_route_inputs(shape, dtype, device, bias=bias, gen=gen)
        x = inputs.u_hat
    with torch.no_grad():
        if zeros == "all":
            x.zero_()
        else:
            x[:, ::2] = 0
            x[0] = 0
    leaves = [t.requires_grad_() for t in inputs if t is not None]
    fn, ref_fn = getattr(capsroute, op), getattr(reference, op)
    v, c = fn(*inputs[:-1], 3, bias=inputs.bias, return_coupling=True)
    ref_leaves = [as_reference(t) for t in leaves]
    ref_in = ref_leaves + ([None] if not bias else [])
    v_ref, c_ref = ref_fn(*ref_in[:-1], 3, bias=ref_in[-1], return_coupling=True)
    assert_close_rel(v, v_ref, TOL[dtype], "v")
    assert_close_rel(c, c_ref, TOL[dtype], "c")
    g = randn(v.shape, gen, dtype=dtype, device=device)
    grads = torch.autograd.grad(v, leaves, g)
    ref_grads = torch.autograd.grad(v_ref, ref_leaves, as_reference(g))
    for gr, rg in zip(grads, ref_grads):
        assert torch.isfinite(gr).all()
        assert rel_err(gr, rg) <= GRAD_TOL[dtype] or (gr - rg.to(gr)).abs().max() < 1e-12


# --- outputs do not alias inputs -----------------------------------------------------------


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    sa, sb = a.untyped_storage(), b.untyped_storage()
    a0, b0 = sa.data_ptr(), sb.data_ptr()
    return a0 < b0 + sb.nbytes() and b0 < a0 + sa.nbytes()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [SMALL_SHAPES[0], Shape(2, 1, 3, 4, 5), Shape(1, 1, 1, 1, 1)],
                         ids=str)
@pytest.mark.parametrize("op", OPS)
def test_outputs_do_not_alias_inputs(op, shape, device):
    """Not even where an output could be a view of an input (N_in = 1, one iteration)."""
    gen = make_generator("alias", op, tuple(shape))
    if op == "dynamic_routing":
        inputs = make_routing_inputs(shape, torch.float32, device, bias=True, gen=gen,
                                     requires_grad=True)
    else:
        inputs = make_route_inputs(shape, torch.float32, device, bias=True, gen=gen,
                                   requires_grad=True)
    fn = getattr(capsroute, op)
    for iterations in (1, 2):
        v, c = fn(*inputs[:-1], iterations, bias=inputs.bias, return_coupling=True)
        g_v = torch.randn_like(v)
        g_c = torch.randn_like(c)
        grads = torch.autograd.grad([v, c], list(inputs), [g_v, g_c], allow_unused=True)
        for t in inputs:
            assert not _overlaps(v, t) and not _overlaps(c, t), "an output aliases an input"
        assert not _overlaps(v, c)
        for gr in grads:
            if gr is None:
                continue
            for t in list(inputs) + [g_v, g_c, v, c]:
                assert not _overlaps(gr, t), "a gradient aliases an input or output"


# --- CUDA tensors and the build ------------------------------------------------------------


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("op", OPS)
def test_cuda_tensors_need_cuda_kernels(op):
    """A build with CUDA kernels runs CUDA tensors (checked against the reference
    throughout this file); a CPU-only build refuses them with a clear RuntimeError, not a
    dispatcher error, whichever argument is on the GPU."""
    shape = SMALL_SHAPES[0]
    gen = make_generator("cuda-build", op)
    if op == "dynamic_routing":
        inputs = make_routing_inputs(shape, torch.float32, "cpu", bias=True, gen=gen)
    else:
        inputs = make_route_inputs(shape, torch.float32, "cpu", bias=True, gen=gen)
    fn = getattr(capsroute, op)
    on_gpu = [t.cuda() for t in inputs]
    if _ops.has_cuda_kernels():
        v = fn(*on_gpu[:-1], 3, bias=on_gpu[-1])
        assert v.is_cuda
        assert_close_rel(v, fn(*inputs[:-1], 3, bias=inputs.bias), TOL[torch.float32], "v")
        return
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        fn(*on_gpu[:-1], 3, bias=on_gpu[-1])
    # only the last argument on the GPU
    mixed = list(inputs[:-1]) + [on_gpu[-1]]
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        fn(*mixed[:-1], 3, bias=mixed[-1])
