"""Pure-PyTorch reference of dynamic routing (Sabour, Frosst & Hinton, 2017).

This module is the oracle of the test suite and the baseline of the benchmarks. It mirrors
the math of shared/DESIGN.md section 1 line for line and is kept deliberately plain: it
materialises the predictions u_hat, the logits and the coupling coefficients, and lets
autograd differentiate the loop. Never optimise it.

Shapes: B batch, N_in input capsules of D_in dims, N_out output capsules of D_out dims.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["dynamic_routing", "route", "squash"]


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """squash(s) = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps), along ``dim``."""
    n2 = (s * s).sum(dim=dim, keepdim=True)
    return n2 / (1 + n2) * s / torch.sqrt(n2 + eps)


def route(
    u_hat: Tensor,
    iterations: int = 3,
    *,
    bias: Optional[Tensor] = None,
    leaky: bool = False,
    detach: bool = False,
    eps: float = 1e-8,
    return_coupling: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Route predictions ``u_hat`` [B, N_in, N_out, D_out] -> v [B, N_out, D_out].

    With ``return_coupling=True`` also returns c [B, N_in, N_out] of the last iteration.
    """
    B, N_in, N_out, D_out = u_hat.shape
    # detach=True: every iteration before the last sees constants only.
    u_hat_early = u_hat.detach() if detach else u_hat
    bias_early = bias.detach() if (detach and bias is not None) else bias

    beta = u_hat.new_zeros(B, N_in, N_out)
    for t in range(1, iterations + 1):
        last = t == iterations
        uh = u_hat if last else u_hat_early
        b_j = bias if last else bias_early
        if leaky:
            # softmax over [beta[b, i, :], 0]; the extra "leak" entry is dropped.
            padded = torch.cat([beta, beta.new_zeros(B, N_in, 1)], dim=2)
            c = torch.softmax(padded, dim=2)[:, :, :N_out]
        else:
            c = torch.softmax(beta, dim=2)  # over the OUTPUT capsules j
        s = (c.unsqueeze(-1) * uh).sum(dim=1)  # [B, N_out, D_out]
        if b_j is not None:
            s = s + b_j
        v = squash(s, dim=-1, eps=eps)
        if not last:
            beta = beta + (u_hat_early * v.unsqueeze(1)).sum(dim=-1)
    if return_coupling:
        return v, c
    return v


def predictions(u: Tensor, weight: Tensor) -> Tensor:
    """u_hat[b, i, j, :] = weight[i, j] @ u[b, i, :] -> [B, N_in, N_out, D_out]."""
    return torch.einsum("ijdk,bik->bijd", weight, u)


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
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """u [B, N_in, D_in], weight [N_in, N_out, D_out, D_in] -> v [B, N_out, D_out]."""
    return route(
        predictions(u, weight),
        iterations,
        bias=bias,
        leaky=leaky,
        detach=detach,
        eps=eps,
        return_coupling=return_coupling,
    )
