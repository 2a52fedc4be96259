"""Capsule-network modules built on the fused routing op.

    import capsroute.nn as capsnn
    digit_caps = capsnn.CapsuleLinear(1152, 8, 10, 16)        # owns weight [1152, 10, 16, 8]
    v = digit_caps(u)                                         # u [B, 1152, 8] -> v [B, 10, 16]

- `CapsuleLinear`: a fully connected capsule layer (predictions + dynamic routing), one op.
- `PrimaryCapsules`: a convolution whose output is cut into capsules and squashed.
- `margin_loss`: the margin loss of Sabour et al. (2017), eq. 4.
- `CapsNet`: the MNIST model of Sabour et al. (2017), with its reconstruction decoder.

Shapes: B batch, N_in / D_in input capsules and their dims, N_out / D_out output capsules
and their dims.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional, reference

__all__ = ["CapsuleLinear", "PrimaryCapsules", "CapsNet", "CapsNetOutput", "margin_loss"]

ROUTINGS = ("fused", "reference")


class CapsuleLinear(nn.Module):
    """Fully connected capsule layer: predictions ``u_hat = weight @ u`` routed dynamically.

    Same math as ``capsroute.dynamic_routing`` (shared/DESIGN.md section 1): the module owns
    ``weight`` [in_caps, out_caps, out_dim, in_dim] and, with ``bias=True``, ``bias``
    [out_caps, out_dim] (added to s in every iteration).

    Args:
        in_caps, in_dim: N_in input capsules of D_in dims.
        out_caps, out_dim: N_out output capsules of D_out dims.
        iterations: routing iterations (3 in the paper).
        bias: learn a bias [out_caps, out_dim].
        leaky: leaky routing (softmax over the logits and an extra 0 that is dropped).
        detach: stop-gradient through every iteration but the last.
        routing: ``"fused"`` (the capsroute op) or ``"reference"`` (capsroute.reference, plain
            PyTorch; same numbers, to compare against). Can be changed later via ``.routing``.
        eps: inside squash's sqrt(|s|^2 + eps).

    Shape:
        forward(u): u [B, in_caps, in_dim] -> v [B, out_caps, out_dim];
        forward(u, return_coupling=True) -> (v, c), c [B, in_caps, out_caps] of the last
        iteration.
    """

    def __init__(
        self,
        in_caps: int,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        iterations: int = 3,
        bias: bool = False,
        leaky: bool = False,
        detach: bool = False,
        *,
        routing: str = "fused",
        eps: float = 1e-8,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_caps", in_caps), ("in_dim", in_dim), ("out_caps", out_caps),
                            ("out_dim", out_dim), ("iterations", iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CapsuleLinear: expected {name} to be a positive int, but "
                                 f"got {value!r}")
        self.in_caps, self.in_dim = in_caps, in_dim
        self.out_caps, self.out_dim = out_caps, out_dim
        self.iterations = iterations
        self.leaky = bool(leaky)
        self.detach = bool(detach)
        self.eps = float(eps)
        self.routing = routing
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(in_caps, out_caps, out_dim, in_dim, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_caps, out_dim, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def routing(self) -> str:
        """``"fused"`` (the capsroute op) or ``"reference"`` (plain PyTorch)."""
        return self._routing

    @routing.setter
    def routing(self, value: str) -> None:
        if value not in ROUTINGS:
            raise ValueError(f"CapsuleLinear: expected routing to be one of {ROUTINGS}, but "
                             f"got {value!r}")
        self._routing = value

    def reset_parameters(self) -> None:
        # Why this scale: at the first iteration c = 1/N_out, so s_j = (1/N_out) sum_i
        # weight[i,j] @ u_i. With weight ~ N(0, std^2) every component of s_j has variance
        # std^2 * N_in * E|u|^2 / N_out^2. The inputs are squashed capsules (|u| < 1), so
        # std = N_out / sqrt(N_in * D_out) gives |s_j| of about 1 at most: the squashed
        # lengths start mid-range (|v| = |s|^2 / (1 + |s|^2) ~ 0.5, between the margins 0.1
        # and 0.9) where squash's slope is large. A fan-in init (std ~ 1/sqrt(D_in)) would
        # saturate every output at |v| ~ 1 for the 1152 inputs of the MNIST model; torch.randn
        # (std 1, as some ports do) even more so.
        std = self.out_caps / math.sqrt(self.in_caps * self.out_dim)
        nn.init.normal_(self.weight, 0.0, std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, u: Tensor, return_coupling: bool = False
                ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """u [B, in_caps, in_dim] -> v [B, out_caps, out_dim] (and c [B, in_caps, out_caps])."""
        impl = functional if self._routing == "fused" else reference
        return impl.dynamic_routing(u, self.weight, self.iterations, bias=self.bias,
                                    leaky=self.leaky, detach=self.detach, eps=self.eps,
                                    return_coupling=return_coupling)

    def extra_repr(self) -> str:
        return (f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
                f"out_dim={self.out_dim}, iterations={self.iterations}, "
                f"bias={self.bias is not None}, leaky={self.leaky}, detach={self.detach}, "
                f"routing={self._routing!r}")


class PrimaryCapsules(nn.Module):
    """Convolution whose output channels are cut into capsules, then squashed.

    The convolution has ``caps_types * caps_dim`` output channels; channel ``k * caps_dim + d``
    is dimension d of capsule type k. Capsules are ordered type-major: capsule index
    ``i = (k * H' + y) * W' + x`` for type k at output position (y, x).

    Args:
        in_channels: channels of the input feature map.
        caps_types: capsule types (convolutional capsule channels), 32 in the paper.
        caps_dim: capsule dims, 8 in the paper.
        kernel_size, stride, padding: of the convolution (9, 2, 0 in the paper).
        eps: of squash.

    Shape:
        x [B, in_channels, H, W] -> u [B, caps_types * H' * W', caps_dim], H', W' the
        convolution's output size (6 x 6 for the paper's 20 x 20 input).
    """

    def __init__(self, in_channels: int, caps_types: int, caps_dim: int, kernel_size: int = 9,
                 stride: int = 2, padding: int = 0, eps: float = 1e-8) -> None:
        super().__init__()
        self.caps_types, self.caps_dim, self.eps = caps_types, caps_dim, eps
        self.conv = nn.Conv2d(in_channels, caps_types * caps_dim, kernel_size, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> u [B, caps_types * H' * W', caps_dim]."""
        y = self.conv(x)
        B, _, H, W = y.shape
        u = y.view(B, self.caps_types, self.caps_dim, H, W).permute(0, 1, 3, 4, 2)
        return functional.squash(u.reshape(B, self.caps_types * H * W, self.caps_dim),
                                 dim=-1, eps=self.eps)

    def extra_repr(self) -> str:
        return f"caps_types={self.caps_types}, caps_dim={self.caps_dim}"


def margin_loss(lengths: Tensor, target: Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                lam: float = 0.5, reduction: str = "mean") -> Tensor:
    """Margin loss (Sabour et al. 2017, eq. 4), summed over classes.

        L_k = T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2

    Args:
        lengths: capsule lengths |v_k| [B, K] (e.g. ``v.norm(dim=-1)``).
        target: class indices [B] (integer) or targets T [B, K] (float, e.g. one-hot).
        m_plus, m_minus, lam: 0.9, 0.1, 0.5 in the paper.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` (-> [B]).

    Returns:
        The loss: a scalar, or [B] with reduction="none".
    """
    if lengths.dim() != 2:
        raise ValueError(f"margin_loss: expected lengths to be [B, K], but got shape "
                         f"{list(lengths.shape)}")
    if target.is_floating_point():
        T = target.to(lengths.dtype)
    else:
        T = F.one_hot(target, lengths.shape[1]).to(lengths.dtype)
    if T.shape != lengths.shape:
        raise ValueError(f"margin_loss: expected target of shape [{lengths.shape[0]}] or "
                         f"{list(lengths.shape)}, but got {list(target.shape)}")
    loss = (T * F.relu(m_plus - lengths).pow(2)
            + lam * (1 - T) * F.relu(lengths - m_minus).pow(2)).sum(dim=1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"margin_loss: expected reduction 'mean', 'sum' or 'none', but got "
                     f"{reduction!r}")


class CapsNetOutput(NamedTuple):
    """What `CapsNet` returns."""

    v: Tensor                       #: digit capsules [B, num_classes, 16]
    lengths: Tensor                 #: their lengths |v| [B, num_classes]: class scores
    reconstruction: Tensor          #: decoder output [B, C, H, W], in [0, 1]
    coupling: Optional[Tensor]      #: c [B, 1152, num_classes] when asked, else None


class CapsNet(nn.Module):
    """The CapsNet of Sabour, Frosst & Hinton (2017) for 28 x 28 digits.

    Conv1 256@9x9 (ReLU) -> PrimaryCaps 32 types x 8D (9x9, stride 2; 6x6 grid: 1152
    capsules) -> DigitCaps num_classes x 16D (dynamic routing, 3 iterations) -> decoder
    FC 512 (ReLU) - 1024 (ReLU) - H*W*C (sigmoid) fed with the digit capsules, all but one
    masked to zero: the one of ``target`` when given (training), else the longest (test).

    Args:
        in_channels, image_size: input images [B, in_channels, image_size, image_size].
        num_classes: digit capsules.
        iterations: routing iterations.
        routing: ``"fused"`` or ``"reference"`` (see `CapsuleLinear`).

    Shape:
        forward(x, target=None, return_coupling=False): x [B, C, H, W], target [B] (int)
        -> `CapsNetOutput` (v [B, K, 16], lengths [B, K], reconstruction [B, C, H, W],
        coupling [B, 1152, K] or None).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 iterations: int = 3, routing: str = "fused") -> None:
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.conv1 = nn.Conv2d(in_channels, 256, kernel_size=9)
        self.primary = PrimaryCapsules(256, caps_types=32, caps_dim=8, kernel_size=9, stride=2)
        grid = ((image_size - 8) - 9) // 2 + 1       # 6 for 28 x 28 inputs
        self.primary_grid = grid
        self.digits = CapsuleLinear(32 * grid * grid, 8, num_classes, 16, iterations,
                                    routing=routing)
        self.decoder = nn.Sequential(
            nn.Linear(16 * num_classes, 512), nn.ReLU(inplace=True),
            nn.Linear(512, 1024), nn.ReLU(inplace=True),
            nn.Linear(1024, in_channels * image_size * image_size), nn.Sigmoid(),
        )

    @property
    def routing(self) -> str:
        """``"fused"`` or ``"reference"``: the routing of the digit capsules."""
        return self.digits.routing

    @routing.setter
    def routing(self, value: str) -> None:
        self.digits.routing = value

    def forward(self, x: Tensor, target: Optional[Tensor] = None,
                return_coupling: bool = False) -> CapsNetOutput:
        """x [B, C, H, W] (pixels in [0, 1]), target [B] or None -> `CapsNetOutput`."""
        u = self.primary(F.relu(self.conv1(x)))                   # [B, 1152, 8]
        if return_coupling:
            v, c = self.digits(u, return_coupling=True)           # [B, K, 16], [B, 1152, K]
        else:
            v, c = self.digits(u), None
        lengths = torch.sqrt((v * v).sum(dim=-1) + 1e-12)         # finite gradient at v = 0
        if target is None:
            target = lengths.argmax(dim=1)
        mask = F.one_hot(target, self.num_classes).to(v.dtype)
        recon = self.decoder((v * mask.unsqueeze(-1)).flatten(1))
        recon = recon.view(x.shape[0], self.in_channels, self.image_size, self.image_size)
        return CapsNetOutput(v, lengths, recon, c)
