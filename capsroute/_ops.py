"""Registration of the capsroute ops with torch.library.

In this order: load the compiled library (which defines the schemas and the CPU/CUDA
kernels), register a fake kernel for every op (shapes only, with the checks the C++ side
makes, so torch.compile can trace the ops), then register autograd so that each forward
op's backward is itself an op, and forward-mode AD through the ops runs the reference.
`dynamic_routing` and `route` here are the ops as the functions call them (see
_register_autograd).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import _C  # noqa: F401  (loads the library: schemas and kernels)
from . import reference

ops = torch.ops.capsroute

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in (and keep the saved sums s in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_cuda_kernels() -> bool:
    """True when this build of capsroute carries CUDA kernels."""
    return HAS_CUDA_KERNELS


# Read once at import: the dispatcher query is not traceable by torch.compile, a constant is.
HAS_CUDA_KERNELS: bool = torch._C._dispatch_has_kernel_for_dispatch_key("capsroute::route", "CUDA")


# --- input checks, the twins of csrc/checks.h (same conditions, same messages) ----------


def _check_float(op: str, name: str, t: Tensor) -> None:
    torch._check_type(
        t.dtype in _FLOATS,
        lambda: f"{op}: expected {name} to be float32, float64, float16 or bfloat16, "
        f"but got {t.dtype}",
    )


def _check_rank(op: str, name: str, t: Tensor, rank: int, layout: str) -> None:
    torch._check_value(
        t.dim() == rank,
        lambda: f"{op}: expected {name} to be a {rank}-D tensor {layout}, but got a "
        f"{t.dim()}-D tensor of shape {list(t.shape)}",
    )


def _check_size(op: str, name: str, t: Tensor, dim: int, expected, what: str) -> None:
    torch._check_value(
        t.shape[dim] == expected,
        lambda: f"{op}: expected {name}.shape[{dim}] == {expected} ({what}), but got "
        f"{name} of shape {list(t.shape)}",
    )


def _check_positive(op: str, name: str, t: Tensor, dims: Sequence[int], whats) -> None:
    for dim, what in zip(dims, whats):
        torch._check_value(
            t.shape[dim] >= 1,
            lambda: f"{op}: expected {name}.shape[{dim}] ({what}) to be at least 1, but "
            f"got {name} of shape {list(t.shape)}",
        )


def _check_same(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    torch._check_type(
        t.dtype == ref.dtype,
        lambda: f"{op}: expected {name} to have the dtype of {ref_name} ({ref.dtype}), "
        f"but got {t.dtype}",
    )
    torch._check(
        t.device == ref.device,
        lambda: f"{op}: expected {name} to be on the device of {ref_name} ({ref.device}), "
        f"but got {t.device}",
    )


def _check_options(op: str, iterations: int, eps: float) -> None:
    torch._check_value(
        iterations >= 1, lambda: f"{op}: expected iterations >= 1, but got {iterations}"
    )
    torch._check_value(
        math.isfinite(eps) and eps >= 0,
        lambda: f"{op}: expected eps to be finite and >= 0, but got {eps}",
    )


def _check_bias(op: str, bias: Optional[Tensor], ref: Tensor, ref_name: str, N_out, D_out):
    if bias is None:
        return
    _check_rank(op, "bias", bias, 2, "[N_out, D_out]")
    _check_size(op, "bias", bias, 0, N_out, "N_out")
    _check_size(op, "bias", bias, 1, D_out, "D_out")
    _check_same(op, "bias", bias, ref_name, ref)


def check_dynamic_routing(u: Tensor, weight: Tensor, bias: Optional[Tensor], iterations: int,
                          eps: float):
    """Validate dynamic_routing's inputs; returns (B, N_in, N_out, D_in, D_out)."""
    op = "capsroute.dynamic_routing"
    _check_float(op, "u", u)
    _check_rank(op, "u", u, 3, "[B, N_in, D_in]")
    _check_rank(op, "weight", weight, 4, "[N_in, N_out, D_out, D_in]")
    _check_same(op, "weight", weight, "u", u)
    _check_positive(op, "u", u, (1, 2), ("N_in", "D_in"))
    _check_size(op, "weight", weight, 0, u.shape[1], "N_in, from u.shape[1]")
    _check_size(op, "weight", weight, 3, u.shape[2], "D_in, from u.shape[2]")
    _check_positive(op, "weight", weight, (1, 2), ("N_out", "D_out"))
    B, N_in, D_in = u.shape
    N_out, D_out = weight.shape[1], weight.shape[2]
    _check_bias(op, bias, u, "u", N_out, D_out)
    _check_options(op, iterations, eps)
    return B, N_in, N_out, D_in, D_out


def check_route(u_hat: Tensor, bias: Optional[Tensor], iterations: int, eps: float):
    """Validate route's inputs; returns (B, N_in, N_out, D_out)."""
    op = "capsroute.route"
    _check_float(op, "u_hat", u_hat)
    _check_rank(op, "u_hat", u_hat, 4, "[B, N_in, N_out, D_out]")
    _check_positive(op, "u_hat", u_hat, (1, 2, 3), ("N_in", "N_out", "D_out"))
    B, N_in, N_out, D_out = u_hat.shape
    _check_bias(op, bias, u_hat, "u_hat", N_out, D_out)
    _check_options(op, iterations, eps)
    return B, N_in, N_out, D_out


def check_backward(op: str, B, N_in, N_out, D_out, grad_v: Tensor, grad_c: Optional[Tensor],
                   s: Tensor, iterations: int) -> None:
    """Validate a backward op's incoming gradients and saved sums (csrc/checks.h,
    check_backward)."""
    _check_rank(op, "grad_v", grad_v, 3, "[B, N_out, D_out]")
    torch._check_value(
        grad_v.shape[0] == B and grad_v.shape[1] == N_out and grad_v.shape[2] == D_out,
        lambda: f"{op}: expected grad_v of shape [{B}, {N_out}, {D_out}], but got "
        f"{list(grad_v.shape)}",
    )
    _check_rank(op, "s", s, 4, "[iterations, B, N_out, D_out]")
    torch._check_value(
        s.shape[0] == iterations and s.shape[1] == B and s.shape[2] == N_out
        and s.shape[3] == D_out,
        lambda: f"{op}: expected s of shape [{iterations}, {B}, {N_out}, {D_out}], but got "
        f"{list(s.shape)}",
    )
    if grad_c is not None:
        _check_rank(op, "grad_c", grad_c, 3, "[B, N_in, N_out]")
        torch._check_value(
            grad_c.shape[0] == B and grad_c.shape[1] == N_in and grad_c.shape[2] == N_out,
            lambda: f"{op}: expected grad_c of shape [{B}, {N_in}, {N_out}], but got "
            f"{list(grad_c.shape)}",
        )


# --- fake kernels --------------------------------------------------------------------


def _forward_outputs(like: Tensor, B, N_in, N_out, D_out, iterations, return_coupling):
    v = like.new_empty(B, N_out, D_out)
    c = like.new_empty(B, N_in, N_out) if return_coupling else like.new_empty(0)
    s = like.new_empty(iterations, B, N_out, D_out, dtype=acc_dtype(like.dtype))
    return v, c, s


@torch.library.register_fake("capsroute::dynamic_routing")
def _dynamic_routing_fake(u, weight, bias, iterations, leaky, detach, eps, return_coupling):
    B, N_in, N_out, _, D_out = check_dynamic_routing(u, weight, bias, iterations, eps)
    return _forward_outputs(u, B, N_in, N_out, D_out, iterations, return_coupling)


@torch.library.register_fake("capsroute::route")
def _route_fake(u_hat, bias, iterations, leaky, detach, eps, return_coupling):
    B, N_in, N_out, D_out = check_route(u_hat, bias, iterations, eps)
    return _forward_outputs(u_hat, B, N_in, N_out, D_out, iterations, return_coupling)


def _grad_bias_like(like: Tensor, has_bias: bool, N_out, D_out) -> Tensor:
    return like.new_empty(N_out, D_out) if has_bias else like.new_empty(0)


@torch.library.register_fake("capsroute::dynamic_routing_backward")
def _dynamic_routing_backward_fake(grad_v, grad_c, u, weight, s, has_bias, iterations, leaky,
                                   detach, eps):
    B, N_in, N_out, _, D_out = check_dynamic_routing(u, weight, None, iterations, eps)
    check_backward("capsroute.dynamic_routing_backward", B, N_in, N_out, D_out, grad_v, grad_c,
                   s, iterations)
    return torch.empty_like(u), torch.empty_like(weight), _grad_bias_like(u, has_bias, N_out, D_out)


@torch.library.register_fake("capsroute::route_backward")
def _route_backward_fake(grad_v, grad_c, u_hat, s, has_bias, iterations, leaky, detach, eps):
    B, N_in, N_out, D_out = check_route(u_hat, None, iterations, eps)
    check_backward("capsroute.route_backward", B, N_in, N_out, D_out, grad_v, grad_c, s,
                   iterations)
    return torch.empty_like(u_hat), _grad_bias_like(u_hat, has_bias, N_out, D_out)


# --- autograd --------------------------------------------------------------------------
# The forward saves its inputs and s [iterations, B, N_out, D_out]: no u_hat, no logits.


def _setup_context(ctx, predictions: Sequence[Tensor], bias, iterations, leaky, detach, eps,
                   return_coupling, output) -> None:
    _, c, s = output
    # bias only for _gradient_graph; the kernels' backward needs none of it.
    ctx.save_for_backward(*predictions, s, *(() if bias is None else (bias,)))
    ctx.options = (bias is not None, iterations, leaky, detach, eps)
    # c^(r) is a constant with detach=True (DESIGN.md section 1), as in the reference.
    ctx.coupling_has_grad = return_coupling and not detach
    ctx.mark_non_differentiable(s)
    if not ctx.coupling_has_grad:
        ctx.mark_non_differentiable(c)
    # Outputs without an incoming gradient reach backward as None (see _incoming), not as
    # zeros that autograd would allocate and fill on every call (s always, c mostly).
    ctx.set_materialize_grads(False)


def _incoming(ctx, grad_v: Optional[Tensor], grad_c: Optional[Tensor], like: Tensor):
    """The gradients the kernels take: grad_v always (zeros when v was unused), grad_c only
    when c was returned and is differentiable."""
    if grad_v is None:
        grad_v = like.new_zeros(ctx.v_shape)
    return grad_v, (grad_c if ctx.coupling_has_grad else None)


# --- gradients of gradients -------------------------------------------------------------
# The backward ops are not themselves differentiable. Where autograd asks for a graph of the
# gradients (create_graph=True: a gradient penalty, second-order meta-learning) and they depend
# on something that requires grad, they come from capsroute.reference instead: the same math
# in plain PyTorch ops, which autograd differentiates again, at the reference's cost in time
# and memory (it materialises u_hat). Before, the second derivatives came out as zeros.


def _gradient_graph_needed(*tensors: Optional[Tensor]) -> bool:
    # Grad mode is on inside a backward only under create_graph=True.
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run_reference(fn, inputs: Sequence[Tensor], bias: Optional[Tensor], iterations: int,
                  leaky: bool, detach: bool, eps: float, return_coupling: bool):
    """fn (reference.dynamic_routing or reference.route) in the kernels' accumulation dtype,
    its outputs cast back to the inputs' dtype, as the op gives them: the way around what the
    kernels do not differentiate (here, and under torch.func's transforms: functional.py)."""
    dtype = inputs[0].dtype
    acc = acc_dtype(dtype)
    out = fn(*(t.to(acc) for t in inputs), iterations, bias=None if bias is None else bias.to(acc),
             leaky=leaky, detach=detach, eps=eps, return_coupling=return_coupling)
    return tuple(t.to(dtype) for t in out) if return_coupling else out.to(dtype)


def _gradient_graph(ctx, fn, inputs: Sequence[Tensor], bias: Optional[Tensor], grad_v, grad_c):
    """The gradients of `inputs` and `bias` (None where not required) as a differentiable
    graph: autograd through run_reference."""
    v, c = run_reference(fn, inputs, bias, *ctx.options[1:], return_coupling=True)
    pairs = [(v, grad_v)]
    if ctx.coupling_has_grad:
        pairs.append((c, grad_c))
    pairs = [(out, grad) for out, grad in pairs if grad is not None]
    wanted = [t for t in (*inputs, bias) if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad([out for out, _ in pairs], wanted,
                                     [grad for _, grad in pairs], create_graph=True,
                                     allow_unused=True) if pairs and wanted else ())
    return tuple(next(grads) if t is not None and t.requires_grad else None
                 for t in (*inputs, bias))


def _dynamic_routing_setup(ctx, inputs, output):
    u, weight, bias, iterations, leaky, detach, eps, return_coupling = inputs
    _setup_context(ctx, (u, weight), bias, iterations, leaky, detach, eps, return_coupling, output)
    ctx.v_shape = output[0].shape


def _dynamic_routing_backward(ctx, grad_v, grad_c, grad_s):
    u, weight, s, *bias = ctx.saved_tensors
    bias = bias[0] if bias else None
    if _gradient_graph_needed(grad_v, grad_c, u, weight, bias):
        grads = _gradient_graph(ctx, reference.dynamic_routing, (u, weight), bias, grad_v, grad_c)
        return (*grads, None, None, None, None, None)
    grad_v, grad_c = _incoming(ctx, grad_v, grad_c, u)
    grad_u, grad_weight, grad_bias = ops.dynamic_routing_backward(
        grad_v, grad_c, u, weight, s, *ctx.options
    )
    return grad_u, grad_weight, grad_bias if bias is not None else None, None, None, None, None, None


def _route_setup(ctx, inputs, output):
    u_hat, bias, iterations, leaky, detach, eps, return_coupling = inputs
    _setup_context(ctx, (u_hat,), bias, iterations, leaky, detach, eps, return_coupling, output)
    ctx.v_shape = output[0].shape


def _route_backward(ctx, grad_v, grad_c, grad_s):
    u_hat, s, *bias = ctx.saved_tensors
    bias = bias[0] if bias else None
    if _gradient_graph_needed(grad_v, grad_c, u_hat, bias):
        grads = _gradient_graph(ctx, reference.route, (u_hat,), bias, grad_v, grad_c)
        return (*grads, None, None, None, None, None)
    grad_v, grad_c = _incoming(ctx, grad_v, grad_c, u_hat)
    grad_u_hat, grad_bias = ops.route_backward(grad_v, grad_c, u_hat, s, *ctx.options)
    return grad_u_hat, grad_bias if bias is not None else None, None, None, None, None, None


# --- the Autograd kernels -----------------------------------------------------------------
# What torch.library.register_autograd registers, without two costs of its generic form that
# every call with grad paid: it rebuilds the schema's argument list to fill in defaults (these
# schemas have none; ~13 us a call on the 2-core CPU machine) and wraps the arguments in a
# metadata object. capsroute.dynamic_routing on tiny CPU tensors: building its graph 42 -> 26
# us, forward+backward through torch.autograd.grad 125 -> 102 us (benchmarks/RESULTS.md). The
# private torch._C calls are the ones torch.library's own kernel makes.
#
# The functions (functional.py) reach the same autograd.Function without the dispatcher where
# nothing on the way needs it (`_plain`): a call through torch.ops goes from Python into the
# dispatcher, back out into the Python Autograd kernel, in again below autograd, and its
# outputs back the same way. Skipping the first trip out and back saved 5-7 us of host time a
# forward and 7-14 us a forward+backward on the CPU machine (benchmarks/RESULTS.md,
# twenty-seventh session).

_LIB = torch.library.Library("capsroute", "IMPL")


def _tangents(args) -> bool:
    """Whether forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) carries a tangent in
    any of the op's arguments."""
    return fwAD._current_level >= 0 and any(
        isinstance(t, Tensor) and fwAD.unpack_dual(t).tangent is not None for t in args
    )


def _plain(args) -> bool:
    """Whether a call with these arguments needs nothing of the dispatcher's keys above
    autograd or of the Autograd kernel's special cases: no torch.compile or torch.jit tracing,
    no torch.func transform (vmap, grad, jvp), no forward-mode AD, and no __torch_function__
    (a tensor subclass or a TorchFunctionMode). Dispatch modes and the backends' keys still see
    the op: it goes through the dispatcher below autograd."""
    return not (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or fwAD._current_level >= 0
        or torch._C._has_torch_function(args)
    )


def _register_autograd(name: str, setup, backward, reference_fn, n_inputs: int):
    """Registers the Autograd kernel of op `name`: with grad, `setup(ctx, args, outputs)` saves
    what `backward(ctx, grad_v, grad_c, grad_s)` needs; under forward-mode AD the outputs come
    from `reference_fn` (the kernels have no tangent rule), whose first `n_inputs` arguments
    are the op's first tensors, then the op's bias and options.

    Returns call(*args): the op's outputs on its arguments, as torch.ops.capsroute.<name>
    gives them, by the same autograd.Function without the trip through the dispatcher where
    the call is `_plain`."""
    op = getattr(ops, name).default
    below = torch._C._after_autograd_keyset

    def redispatch(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            if keyset is None:  # from call(): the dispatcher works the keys out below autograd
                return op(*args)
            return op.redispatch(keyset & below, *args)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, *args):
            out = redispatch(keyset, args)
            setup(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return (None, *backward(ctx, *grads))

    def with_grad(args) -> bool:
        return torch.is_grad_enabled() and torch._C._any_requires_grad(*args)

    def kernel(keyset, *args):
        if _tangents(args):
            # s, which carries no derivative, from the kernels (which check the inputs first);
            # v and c with their tangents from the reference.
            s = redispatch(keyset, args)[2]
            out = run_reference(reference_fn, args[:n_inputs], *args[n_inputs:])
            return_coupling = args[-1]
            v, c = out if return_coupling else (out, args[0].new_empty(0))
            return v, c, s
        if with_grad(args):
            return Function.apply(keyset, *args)
        return redispatch(keyset, args)

    def call(*args):
        if not _plain(args):
            return op(*args)
        if with_grad(args):
            return Function.apply(None, *args)
        return redispatch(None, args)

    _LIB.impl(name, kernel, "Autograd", with_keyset=True)
    return call


dynamic_routing = _register_autograd("dynamic_routing", _dynamic_routing_setup,
                                     _dynamic_routing_backward, reference.dynamic_routing, 2)
route = _register_autograd("route", _route_setup, _route_backward, reference.route, 1)
