"""Shared configuration of the capsroute test suite.

Every test that touches a kernel is parametrised over `DEVICES` (CPU, plus CUDA when a GPU is
present: the same tests run their CUDA cases on a GPU machine) and over `DTYPES` or a subset.
Results are compared against `capsroute.reference` computed in float64 on the same (rounded)
inputs, with the dtype-aware tolerances of `TOL`, on fresh random inputs whose scale keeps
squash out of saturation so that routing actually routes (see `weight_scale`).

Test modules import these helpers with `from conftest import ...` (pytest puts this folder on
sys.path, the default "prepend" import mode).
"""
from __future__ import annotations

import math
import os
import zlib
from typing import Dict, NamedTuple, Optional, Sequence

import pytest
import torch

import capsroute
from capsroute import reference

# --- what the tests run over ------------------------------------------------------------

# CAPSROUTE_TEST_DEVICES=cpu (a comma-separated list) restricts the devices, e.g. to test a
# CPU-only (or sanitizer) build on a machine with a GPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
if os.environ.get("CAPSROUTE_TEST_DEVICES"):
    DEVICES = [d for d in os.environ["CAPSROUTE_TEST_DEVICES"].split(",") if d in DEVICES]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FULL_DTYPES = [torch.float32, torch.float64]
HALF_DTYPES = [torch.float16, torch.bfloat16]

# Relative-norm tolerances ||out - ref|| / ||ref|| against the float64 reference of the same
# inputs. Half types: the kernels accumulate in float32, the outputs are rounded to the type
# (2^-8 for bfloat16, 2^-11 for float16), so the bound is a few roundings.
TOL: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 3e-3,
    torch.bfloat16: 1e-2,
}
# Gradients pass through every routing iteration (a longer chain of roundings than the
# values); float32 gets a little more room, the others stay as above.
GRAD_TOL: Dict[torch.dtype, float] = dict(TOL)
GRAD_TOL[torch.float32] = 3e-5

# The operators that convert or copy a tensor (as torch.profiler names them): a backward in
# the inputs' own dtype needs none of them (test_backward_converts_nothing and its emulated
# twin).
COPY_OPS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous"}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --- shapes -------------------------------------------------------------------------------


class Shape(NamedTuple):
    B: int
    N_in: int
    N_out: int
    D_in: int
    D_out: int

    def __str__(self) -> str:
        return f"B{self.B}_Nin{self.N_in}_Nout{self.N_out}_Din{self.D_in}_Dout{self.D_out}"


# Odd sizes: ones, primes, N_out = 1, D = 1, none a multiple of a block size.
SMALL_SHAPES = [
    Shape(3, 7, 5, 3, 11),
    Shape(1, 1, 1, 1, 1),
    Shape(2, 5, 1, 4, 3),   # N_out = 1: softmax over a single output
    Shape(4, 3, 2, 1, 1),   # D_in = D_out = 1
    Shape(1, 2, 3, 5, 7),
    Shape(5, 13, 7, 2, 1),  # D_out = 1
    Shape(2, 37, 3, 2, 5),  # N_in past the CPU kernel's 32 chunks, not a multiple of them
]
# The MNIST DigitCaps layer at a small batch (the reference is slow at this size).
CANONICAL = Shape(2, 1152, 10, 8, 16)


# --- inputs -------------------------------------------------------------------------------


def make_generator(*key) -> torch.Generator:
    """A CPU generator seeded from `key`: fresh inputs per case, the same on every run."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(key).encode()))
    return g


def randn(shape: Sequence[int], gen: torch.Generator, *, dtype=torch.float64, device="cpu",
          scale: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    """Normal samples made on the CPU in float64 (so that every device sees the same numbers),
    then moved and rounded to `dtype`."""
    t = torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale + mean
    return t.to(device=device, dtype=dtype)


def weight_scale(N_in: int, N_out: int, D_in: int, D_out: int, target: float = 1.5) -> float:
    """The std of W's entries (u ~ N(0, 1)) for which |s| is about `target` in the first
    iteration (c = 1/N_out): squash is neither linear nor saturated, and the predictions are
    large enough for the routing logits to move the coupling coefficients."""
    return target * N_out / math.sqrt(D_out * N_in * D_in)


def prediction_scale(N_in: int, N_out: int, D_out: int, target: float = 1.5) -> float:
    """The std of u_hat's entries for which |s| is about `target` in the first iteration."""
    return target * N_out / math.sqrt(D_out * N_in)


class RoutingInputs(NamedTuple):
    u: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]


class RouteInputs(NamedTuple):
    u_hat: torch.Tensor
    bias: Optional[torch.Tensor]


def make_routing_inputs(shape: Shape, dtype, device, *, bias: bool, gen: torch.Generator,
                        requires_grad: bool = False) -> RoutingInputs:
    B, N_in, N_out, D_in, D_out = shape
    u = randn((B, N_in, D_in), gen, dtype=dtype, device=device)
    w = randn((N_in, N_out, D_out, D_in), gen, dtype=dtype, device=device,
              scale=weight_scale(N_in, N_out, D_in, D_out))
    b = randn((N_out, D_out), gen, dtype=dtype, device=device, scale=0.5) if bias else None
    if requires_grad:
        for t in (u, w, b):
            if t is not None:
                t.requires_grad_(True)
    return RoutingInputs(u, w, b)


def make_route_inputs(shape: Shape, dtype, device, *, bias: bool, gen: torch.Generator,
                      requires_grad: bool = False) -> RouteInputs:
    B, N_in, N_out, _, D_out = shape
    u_hat = randn((B, N_in, N_out, D_out), gen, dtype=dtype, device=device,
                  scale=prediction_scale(N_in, N_out, D_out))
    b = randn((N_out, D_out), gen, dtype=dtype, device=device, scale=0.5) if bias else None
    if requires_grad:
        for t in (u_hat, b):
            if t is not None:
                t.requires_grad_(True)
    return RouteInputs(u_hat, b)


def as_reference(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The same numbers in float64 on the CPU, as a fresh leaf (requires_grad as `t`)."""
    if t is None:
        return None
    return t.detach().to(device="cpu", dtype=torch.float64).requires_grad_(t.requires_grad)


# --- comparison ---------------------------------------------------------------------------


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU (0 when both are empty or zero)."""
    out = out.detach().to(device="cpu", dtype=torch.float64)
    ref = ref.detach().to(device="cpu", dtype=torch.float64)
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if ref.numel() == 0:
        return 0.0
    num = (out - ref).norm().item()
    den = ref.norm().item()
    if den == 0.0:
        return num
    return num / den


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    assert out is not None, f"{what}: got None"
    assert torch.isfinite(ref).all(), f"{what}: the reference is not finite"
    assert torch.isfinite(out).all(), f"{what}: output is not finite"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def poison_allocator(device, *shapes: Sequence[int], dtype=torch.float32) -> None:
    """Allocate NaN-filled blocks of the given shapes and free them right away, so that the
    outputs of the next op are likely to land on NaN memory (CUDA's caching allocator hands
    the same blocks back; glibc's malloc usually does for small sizes). A kernel that
    leaves part of an output unwritten then shows NaN there instead of stale finite data."""
    blocks = [torch.full(tuple(s), float("nan"), dtype=dtype, device=device) for s in shapes]
    del blocks


# --- markers ------------------------------------------------------------------------------


def pytest_collection_modifyitems(config, items):
    # Slow tests (e.g. shapes past 2^31 predictions on the CPU) run only on request.
    if os.environ.get("CAPSROUTE_SLOW_TESTS", "0") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set CAPSROUTE_SLOW_TESTS=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# --- hypothesis ---------------------------------------------------------------------------

try:
    from hypothesis import HealthCheck, settings

    # "ci" (the default): derandomised, so every run draws the same examples.
    # HYPOTHESIS_PROFILE=dev: random draws, for hunting new failures locally (with
    # CAPSROUTE_HYPOTHESIS_SCALE=10, say, for ten times the examples). No example database:
    # a failure prints the blob that reproduces it.
    settings.register_profile(
        "ci", derandomize=True, deadline=None, print_blob=True, database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "dev", derandomize=False, deadline=None, print_blob=True, database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a dev requirement; only test_properties.py needs it
    pass


def hypothesis_examples(n: int) -> int:
    """max_examples for a property test: n, times CAPSROUTE_HYPOTHESIS_SCALE if set."""
    return max(1, int(n * float(os.environ.get("CAPSROUTE_HYPOTHESIS_SCALE", "1"))))


@pytest.fixture(autouse=True)
def _cuda_sync():
    """Synchronise the GPU after every test so that an asynchronous kernel error is reported
    by the test that caused it."""
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# --- one routing case against the reference ------------------------------------------


OPS = ["dynamic_routing", "route"]


def run_case(op: str, shape: Shape, dtype, device, *, iterations: int, bias: bool, leaky: bool,
             detach: bool, return_coupling: bool, eps: float = 1e-8, key=()):
    """Run capsroute.<op> forward and backward on fresh random inputs, and the reference in
    float64 on the same inputs; compare v (and c) and every input's gradient.

    Returns the largest relative error seen per output / gradient, for diagnostics."""
    gen = make_generator(op, tuple(shape), str(dtype), iterations, bias, leaky, detach,
                         return_coupling, eps, *key)
    if op == "dynamic_routing":
        inputs = make_routing_inputs(shape, dtype, device, bias=bias, gen=gen,
                                     requires_grad=True)
        names = ["u", "weight", "bias"]
    else:
        inputs = make_route_inputs(shape, dtype, device, bias=bias, gen=gen, requires_grad=True)
        names = ["u_hat", "bias"]
    fn = getattr(capsroute, op)
    ref_fn = getattr(reference, op)
    kwargs = dict(bias=inputs.bias, leaky=leaky, detach=detach, eps=eps,
                  return_coupling=return_coupling)
    v_numel = shape.B * shape.N_out * shape.D_out
    poison_allocator(device, (shape.B * shape.N_in * shape.N_out,), (v_numel,),
                     (iterations * v_numel,), dtype=dtype)
    out = fn(*inputs[:-1], iterations, **kwargs)
    ref_inputs = [as_reference(t) for t in inputs]
    ref_kwargs = dict(kwargs, bias=ref_inputs[-1])
    ref_out = ref_fn(*ref_inputs[:-1], iterations, **ref_kwargs)
    if not return_coupling:
        out, ref_out = (out,), (ref_out,)

    B, N_in, N_out, _, D_out = shape
    v = out[0]
    assert isinstance(v, torch.Tensor) and v.shape == (B, N_out, D_out)
    assert v.dtype == dtype and v.device.type == device
    results = [("v", v, ref_out[0], TOL[dtype])]
    if return_coupling:
        c = out[1]
        assert c.shape == (B, N_in, N_out) and c.dtype == dtype and c.device.type == device
        results.append(("c", c, ref_out[1], TOL[dtype]))
        # With detach=True c^(r) is a constant (DESIGN.md section 1), as in the reference;
        # without, it depends on the inputs from the second iteration on (c^(1) is uniform,
        # so either answer is right for iterations=1: its gradient is zero).
        if detach:
            assert not c.requires_grad, "c must be a constant with detach=True"
        elif iterations > 1:
            assert c.requires_grad, "c must carry gradient with detach=False"

    # Backward with random incoming gradients, through c as well when it carries gradient.
    grads_out = [randn(v.shape, gen, dtype=dtype, device=device)]
    diff_out = [v]
    ref_diff_out = [ref_out[0]]
    if return_coupling and out[1].requires_grad:
        g_c = randn(out[1].shape, gen, dtype=dtype, device=device)
        grads_out.append(g_c)
        diff_out.append(out[1])
        if ref_out[1].requires_grad:
            ref_diff_out.append(ref_out[1])
        else:  # iterations=1: c is constant in the reference, its gradient adds nothing
            assert iterations == 1
    leaves = [(n, t, r) for n, t, r in zip(names, inputs, ref_inputs) if t is not None]
    poison_allocator(device, *[t.shape for _, t, _ in leaves], dtype=dtype)
    grads = torch.autograd.grad(diff_out, [t for _, t, _ in leaves], grads_out)
    ref_grads = torch.autograd.grad(ref_diff_out, [r for _, _, r in leaves],
                                    [as_reference(g) for g in grads_out[:len(ref_diff_out)]])
    for (name, t, _), g, rg in zip(leaves, grads, ref_grads):
        assert g.shape == t.shape and g.dtype == t.dtype and g.device == t.device, name
        results.append((f"grad_{name}", g, rg, GRAD_TOL[dtype]))

    def float32_reference():
        """The same reference computation in float32, on the same inputs and incoming
        gradients: its error measures how well-conditioned this case is."""
        ins = [None if t is None else t.detach().to(torch.float32).requires_grad_()
               for t in ref_inputs]
        o = ref_fn(*ins[:-1], iterations, **dict(kwargs, bias=ins[-1]))
        o = o if return_coupling else (o,)
        diff = [o[0]] + ([o[1]] if len(ref_diff_out) > 1 else [])
        gs = torch.autograd.grad(diff, [t for t in ins if t is not None],
                                 [g.detach().cpu().float() for g in grads_out[:len(diff)]])
        return list(o) + list(gs)

    errors, f32 = {}, None
    for k, (name, out_t, ref_t, tol) in enumerate(results):
        assert torch.isfinite(ref_t).all(), f"{name}: the reference is not finite"
        assert torch.isfinite(out_t).all(), f"{name}: output is not finite"
        err = errors[name] = rel_err(out_t, ref_t)
        if err <= tol or dtype == torch.float64:
            assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"
            continue
        # An ill-conditioned case (a sharp softmax after many iterations, cancellation in
        # its backward): allow what float32 arithmetic itself loses on it. Rounding in
        # another order (the kernels form the logits from running sums of v) loses a
        # different amount, seen up to ~7x the reference's own float32 error; a bug gives
        # errors of order one.
        if f32 is None:
            f32 = float32_reference()
        err32 = rel_err(f32[k], ref_t)
        assert err <= tol + 16 * err32, (
            f"{name}: relative error {err:.3e} > {tol:.1e} + 16 x {err32:.1e} (the error of "
            f"the reference computed in float32)")
    return errors


__all__ = [
    "DEVICES", "DTYPES", "FULL_DTYPES", "HALF_DTYPES", "TOL", "GRAD_TOL", "Shape",
    "SMALL_SHAPES", "CANONICAL", "make_generator", "randn", "weight_scale",
    "prediction_scale", "RoutingInputs", "RouteInputs", "make_routing_inputs",
    "make_route_inputs", "as_reference", "rel_err", "assert_close_rel", "poison_allocator",
    "dtype_id", "OPS", "run_case", "hypothesis_examples",
]
