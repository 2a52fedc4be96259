"""The public functional API: fused dynamic routing on CPU and CUDA.

Shapes: B batch, N_in input capsules of D_in dims, N_out output capsules of D_out dims.
The math is shared/DESIGN.md section 1; `capsroute.reference` is the same API in plain
PyTorch and gives the same numbers.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _ops, reference

__all__ = ["dynamic_routing", "route", "squash"]

RoutingOutput = Union[Tensor, Tuple[Tensor, Tensor]]


def _options(iterations, eps) -> Tuple[int, float]:
    # Python-level type checks; the values are checked by the op itself. Integers and reals of
    # other types (numpy's, from a config file) are taken as torch's own ops take them; bools
    # and tensors are not (a tensor's value would mean a device sync). A plain int and float,
    # the usual call, skip the checks against the numbers ABCs, a few microseconds of host
    # time per call.
    if type(iterations) is int and type(eps) is float:
        return iterations, eps
    if isinstance(iterations, (bool, Tensor)) or not isinstance(iterations, numbers.Integral):
        raise TypeError(f"capsroute: expected iterations to be an int, but got "
                        f"{type(iterations).__name__}")
    if isinstance(eps, (bool, Tensor)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"capsroute: expected eps to be a float, but got {type(eps).__name__}")
    return int(iterations), float(eps)


def _prepare(*tensors: Optional[Tensor]):
    """Apply autocast (the op is matmul-like: it runs in the autocast dtype and accumulates
    in float32; as for PyTorch's own ops, float64 inputs are left alone) and refuse CUDA
    tensors, in any argument, when this build has no CUDA kernels."""
    first = tensors[0]
    if not _ops.HAS_CUDA_KERNELS and any(isinstance(t, Tensor) and t.is_cuda for t in tensors):
        raise RuntimeError(
            "capsroute was built without CUDA kernels, but got a CUDA tensor; reinstall "
            "with a CUDA toolkit and a CUDA build of torch (see README.md, 'Install')"
        )
    device_type = first.device.type if isinstance(first, Tensor) else "cpu"
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        tensors = tuple(
            t.to(dtype)
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
            else t
            for t in tensors
        )
    return tensors


def _under_func_grad() -> bool:
    """Whether torch.func's reverse mode (grad, vjp, jacrev; hessian) is on.
    The ops have no functorch rule there (torch.func.grad would fail inside torch), so the
    functions run the reference, which the transforms differentiate as they do any PyTorch
    code. Forward-mode AD (torch.autograd.forward_ad; torch.func.jvp, jacfwd) needs nothing
    here: the ops themselves run the reference for it (capsroute/_ops.py, _register_autograd).
    torch.func.vmap needs no rule either: torch runs the op once per example."""
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    if functorch.maybe_current_level() is None:
        return False
    grad = functorch.TransformType.Grad
    return any(level.key() == grad for level in functorch.get_interpreter_stack())


def dynamic_routing(
    u: Tensor,
    weight: Tensor,
    iterations: int = 3,
    *,
    bias: Optional[Tensor] = None,
    leaky: bool = False,
    detach: bool = False,
    eps: float = 1e-8,
    return_coupling: bool = False,
) -> RoutingOutput:
    """Dynamic routing from lower capsules, fused: predictions are never materialised.

    Args:
        u: lower capsules [B, N_in, D_in].
        weight: transforms [N_in, N_out, D_out, D_in]; u_hat[b,i,j] = weight[i,j] @ u[b,i].
        iterations: routing iterations r >= 1.
        bias: optional [N_out, D_out], added to s in every iteration.
        leaky: softmax over [logits, 0] with the extra entry dropped (leaky routing).
        detach: stop-gradient through every iteration but the last.
        eps: inside squash's sqrt(|s|^2 + eps); keeps the gradient finite at s = 0.
        return_coupling: also return c [B, N_in, N_out] of the last iteration.

    Returns:
        v [B, N_out, D_out], or (v, c) with return_coupling=True.
    """
    iterations, eps = _options(iterations, eps)
    u, weight, bias = _prepare(u, weight, bias)
    if _under_func_grad():
        _ops.check_dynamic_routing(u, weight, bias, iterations, eps)
        return _ops.run_reference(reference.dynamic_routing, (u, weight), bias, iterations,
                                  leaky, detach, eps, return_coupling)
    v, c, _ = _ops.dynamic_routing(u, weight, bias, iterations, leaky, detach, eps,
                                   return_coupling)
    return (v, c) if return_coupling else v


def _contiguous_to_save(u_hat: Tensor) -> Tensor:
    """u_hat as the kernels read it: contiguous. The op would copy a strided u_hat itself, in
    the forward and again in the backward from the view that autograd saved. The README's
    CapsNet-Keras port passes a transposed one: on a 2-core CPU at B=32 its forward+backward
    took 27.6-33.4 ms with both copies, 16.6-21.2 ms with one (three runs each). Copied here,
    the copy is what autograd saves, in place of the view. Not for an expanded view (a zero
    stride), whose copy would hold more memory than the view does; and left to the compiler
    under torch.compile."""
    if u_hat.is_contiguous() or torch.compiler.is_compiling():
        return u_hat
    if any(stride == 0 and size > 1 for stride, size in zip(u_hat.stride(), u_hat.shape)):
        return u_hat
    return u_hat.contiguous()


def route(
    u_hat: Tensor,
    iterations: int = 3,
    *,
    bias: Optional[Tensor] = None,
    leaky: bool = False,
    detach: bool = False,
    eps: float = 1e-8,
    return_coupling: bool = False,
) -> RoutingOutput:
    """Dynamic routing from predictions a model already made.

    Args:
        u_hat: predictions [B, N_in, N_out, D_out].
        (the rest as in `dynamic_routing`)

    Returns:
        v [B, N_out, D_out], or (v, c) with c [B, N_in, N_out] when return_coupling=True.
    """
    iterations, eps = _options(iterations, eps)
    u_hat, bias = _prepare(u_hat, bias)
    if _under_func_grad():
        _ops.check_route(u_hat, bias, iterations, eps)
        return _ops.run_reference(reference.route, (u_hat,), bias, iterations, leaky, detach,
                                  eps, return_coupling)
    v, c, _ = _ops.route(_contiguous_to_save(u_hat), bias, iterations, leaky, detach, eps,
                         return_coupling)
    return (v, c) if return_coupling else v


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """squash(s) = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) along ``dim``.

    A composite of torch ops (differentiable, compilable); the routing ops apply the same
    function inside their kernels.
    """
    _, eps = _options(1, eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"capsroute.squash: expected eps to be finite and >= 0, but got {eps}")
    return reference.squash(s, dim=dim, eps=eps)
