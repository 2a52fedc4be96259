"""The README's "Porting your routing loop" snippets give the numbers of the loops they replace.

Each loop below is written the way the popular repository of its layout writes it (same
layout, same order of operations), independently of capsroute.reference, and the snippet
that replaces it is the exact line shown in README.md (`test_readme_shows_the_snippets`).
Outputs, coupling coefficients and gradients must agree to ~1e-10 in float64, on fresh
random inputs. Devices: the CPU, plus CUDA when a GPU is present.
"""
from __future__ import annotations

import re
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import capsroute

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
README = Path(__file__).resolve().parents[1] / "README.md"
RTOL = 1e-10

# The README's snippets, verbatim.
SNIPPET_A = "v = capsroute.dynamic_routing(x, self.weight.permute(1, 0, 2, 3), self.routings, detach=True)"
SNIPPET_B1 = "W = weights.view(input_dim, input_atoms, output_dim, output_atoms).permute(0, 2, 3, 1)"
SNIPPET_B2 = "v = capsroute.dynamic_routing(input_tensor, W, num_routing, bias=biases, leaky=leaky, eps=0.0)"
SNIPPET_C = "v = capsroute.route(inputs_hat.transpose(1, 2), self.routings, eps=1e-7)"

SHAPES = [  # B, N_in, N_out, D_in, D_out
    (3, 37, 5, 4, 6),
    (2, 1152, 10, 8, 16),   # the MNIST DigitCaps layer
    (1, 7, 1, 1, 3),        # one output capsule, one input dim
]


def gen(*key) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(key).encode()))
    return g


def randn(shape, g, device, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device)


def squash_sqrt_eps(s: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps): the squash of capsroute (and of
    CapsNet-Keras, with eps = K.epsilon() = 1e-7)."""
    n2 = (s ** 2).sum(dim=dim, keepdim=True)
    return n2 / (1 + n2) / torch.sqrt(n2 + eps) * s


def run_snippet(code: str, namespace: dict, *, with_coupling: bool):
    """exec the README line(s); with_coupling adds return_coupling=True to the last call."""
    lines = code.split("\n")
    if with_coupling:
        assert lines[-1].startswith("v = ") and lines[-1].endswith(")")
        lines[-1] = "v, c = " + lines[-1][4:-1] + ", return_coupling=True)"
    ns = dict(namespace, capsroute=capsroute)
    exec("\n".join(lines), ns)
    return (ns["v"], ns["c"]) if with_coupling else ns["v"]


def check_same(out, ref, inputs, ref_inputs, g, device):
    """Values, then the gradients of every input for one random upstream gradient."""
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=1e-13)
    g_out = randn(out.shape, g, device)
    grads = torch.autograd.grad(out, inputs, g_out)
    ref_grads = torch.autograd.grad(ref, ref_inputs, g_out)
    for n, (a, b) in enumerate(zip(grads, ref_grads)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-13, msg=lambda m: f"grad {n}: {m}")


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


# --- (a) weight [N_out, N_in, D_out, D_in], x_hat [B, N_out, N_in, D_out], stop-gradient --
# As in XifengGuo/CapsNet-Pytorch (capsulelayers.py, DenseCapsule.forward): the usual
# PyTorch port with `x_hat.detach()` in every iteration but the last.


def loop_a(x, weight, routings, squash=squash_sqrt_eps):
    x_hat = torch.squeeze(torch.matmul(weight, x[:, None, :, :, None]), dim=-1)
    x_hat_detached = x_hat.detach()
    b = torch.zeros(x.size(0), weight.size(0), weight.size(1), dtype=x.dtype, device=x.device)
    for i in range(routings):
        c = F.softmax(b, dim=1)                                   # over the output capsules
        if i == routings - 1:
            outputs = squash(torch.sum(c[:, :, :, None] * x_hat, dim=-2, keepdim=True))
        else:
            outputs = squash(torch.sum(c[:, :, :, None] * x_hat_detached, dim=-2, keepdim=True))
            b = b + torch.sum(outputs * x_hat_detached, dim=-1)
    return torch.squeeze(outputs, dim=-2), c                     # c: [B, N_out, N_in]


def squash_repo_a(inputs, axis=-1):
    """XifengGuo/CapsNet-Pytorch's own squash: eps added to the norm, not inside the sqrt."""
    norm = torch.norm(inputs, p=2, dim=axis, keepdim=True)
    scale = norm ** 2 / (1 + norm ** 2) / (norm + 1e-8)
    return scale * inputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routings", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_porting_a_pytorch_detach_layout(shape, routings, device):
    B, N_in, N_out, D_in, D_out = shape
    g = gen("a", shape, routings, device)
    x0 = capsroute.squash(randn((B, N_in, D_in), g, device, 1.5))
    W0 = randn((N_out, N_in, D_out, D_in), g, device, 1.5 * N_out / (N_in * D_out) ** 0.5)

    x, W = leaves(x0, W0)
    v = run_snippet(SNIPPET_A, dict(x=x, self=SimpleNamespace(weight=W, routings=routings)),
                    with_coupling=False)
    rx, rW = leaves(x0, W0)
    ref, _ = loop_a(rx, rW, routings)
    assert v.shape == (B, N_out, D_out)
    check_same(v, ref, [x, W], [rx, rW], g, device)

    v, c = run_snippet(SNIPPET_A, dict(x=x, self=SimpleNamespace(weight=W, routings=routings)),
                       with_coupling=True)
    _, ref_c = loop_a(rx, rW, routings)
    torch.testing.assert_close(c, ref_c.transpose(1, 2), rtol=RTOL, atol=1e-13)
    assert not c.requires_grad  # detach=True: the coupling coefficients are constants

    # With the repository's own squash (eps on the norm) the difference is of the order of
    # its 1e-8, not more.
    ref_repo, _ = loop_a(rx, rW, routings, squash=squash_repo_a)
    torch.testing.assert_close(v, ref_repo, rtol=1e-6, atol=1e-8)


# --- (b) the official TensorFlow release: weights [N_in, D_in, N_out * D_out], biases, ----
# leaky routing. As in Sarasra/models, research/capsules/models/layers/layers.py (capsule,
# _update_routing, _leaky_routing, _squash), in PyTorch: full gradient through every
# iteration, the logits updated after the last iteration too, and a squash without eps.


def tf_squash(input_tensor):
    norm = torch.norm(input_tensor, dim=2, keepdim=True)
    norm_squared = norm * norm
    return (input_tensor / norm) * (norm_squared / (1 + norm_squared))


def tf_leaky_routing(logits, output_dim):
    leak = torch.zeros_like(logits)
    leak = torch.sum(leak, dim=2, keepdim=True)
    leaky_logits = torch.cat([leak, logits], dim=2)
    leaky_routing = F.softmax(leaky_logits, dim=2)
    return torch.split(leaky_routing, [1, output_dim], 2)[1]


def tf_update_routing(votes, biases, logit_shape, input_dim, output_dim, num_routing, leaky):
    votes_trans = votes.permute(3, 0, 1, 2)                       # [atoms, B, in, out]
    logits = torch.zeros(logit_shape, dtype=votes.dtype, device=votes.device)
    activations = []
    for i in range(num_routing):
        if leaky:
            route = tf_leaky_routing(logits, output_dim)
        else:
            route = F.softmax(logits, dim=2)
        preactivate_unrolled = route * votes_trans
        preact_trans = preactivate_unrolled.permute(1, 2, 3, 0)
        preactivate = torch.sum(preact_trans, dim=1) + biases
        activation = tf_squash(preactivate)
        activations.append(activation)
        act_3d = activation.unsqueeze(1)
        act_replicated = act_3d.repeat(1, input_dim, 1, 1)
        distances = torch.sum(votes * act_replicated, dim=3)
        logits = logits + distances
    return activations[num_routing - 1], route


def tf_capsule(input_tensor, weights, biases, input_dim, output_dim, input_atoms,
               output_atoms, num_routing, leaky):
    input_tiled = input_tensor.unsqueeze(-1).repeat(1, 1, 1, output_dim * output_atoms)
    votes = torch.sum(input_tiled * weights, dim=2)
    votes_reshaped = votes.reshape(-1, input_dim, output_dim, output_atoms)
    logit_shape = (input_tensor.shape[0], input_dim, output_dim)
    return tf_update_routing(votes_reshaped, biases, logit_shape, input_dim, output_dim,
                             num_routing, leaky)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leaky", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_porting_b_tensorflow_release_layout(shape, leaky, device):
    B, N_in, N_out, D_in, D_out = shape
    num_routing = 3
    g = gen("b", shape, leaky, device)
    u0 = capsroute.squash(randn((B, N_in, D_in), g, device, 1.5))
    w0 = randn((N_in, D_in, N_out * D_out), g, device, 1.5 * N_out / (N_in * D_out) ** 0.5)
    b0 = randn((N_out, D_out), g, device, 0.3)
    names = dict(input_dim=N_in, input_atoms=D_in, output_dim=N_out, output_atoms=D_out,
                 num_routing=num_routing, leaky=leaky)

    u, w, b = leaves(u0, w0, b0)
    ns = dict(names, input_tensor=u, weights=w, biases=b)
    v = run_snippet(SNIPPET_B1 + "\n" + SNIPPET_B2, ns, with_coupling=False)
    ru, rw, rb = leaves(u0, w0, b0)
    ref, _ = tf_capsule(ru, rw, rb, N_in, N_out, D_in, D_out, num_routing, leaky)
    assert v.shape == (B, N_out, D_out)
    check_same(v, ref, [u, w, b], [ru, rw, rb], g, device)

    v, c = run_snippet(SNIPPET_B1 + "\n" + SNIPPET_B2, ns, with_coupling=True)
    ref, ref_c = tf_capsule(ru, rw, rb, N_in, N_out, D_in, D_out, num_routing, leaky)
    # Through the coupling coefficients too (detach=False differentiates every iteration).
    check_same(c, ref_c, [u, w, b], [ru, rw, rb], g, device)


# --- (c) routing from predictions the model already made: CapsNet-Keras's layout --------
# inputs_hat [B, N_out, N_in, D_out], full gradient, squash with K.epsilon() = 1e-7 inside
# the sqrt. As in XifengGuo/CapsNet-Keras (capsulelayers.py, CapsuleLayer.call), in PyTorch.


def keras_routing(inputs_hat, routings):
    b = torch.zeros(inputs_hat.shape[:3], dtype=inputs_hat.dtype, device=inputs_hat.device)
    for i in range(routings):
        c = F.softmax(b, dim=1)
        outputs = squash_sqrt_eps(torch.einsum("bji,bjid->bjd", c, inputs_hat), eps=1e-7)
        if i < routings - 1:
            b = b + torch.einsum("bjd,bjid->bji", outputs, inputs_hat)
    return outputs, c


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routings", [2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_porting_c_route_from_predictions(shape, routings, device):
    B, N_in, N_out, _, D_out = shape
    g = gen("c", shape, routings, device)
    uh0 = randn((B, N_out, N_in, D_out), g, device, 1.5 * N_out / (N_in * D_out) ** 0.5)

    (inputs_hat,) = leaves(uh0)
    ns = dict(inputs_hat=inputs_hat, self=SimpleNamespace(routings=routings))
    v = run_snippet(SNIPPET_C, ns, with_coupling=False)
    (ref_hat,) = leaves(uh0)
    ref, _ = keras_routing(ref_hat, routings)
    assert v.shape == (B, N_out, D_out)
    check_same(v, ref, [inputs_hat], [ref_hat], g, device)

    v, c = run_snippet(SNIPPET_C, ns, with_coupling=True)
    ref, ref_c = keras_routing(ref_hat, routings)
    check_same(c, ref_c.transpose(1, 2), [inputs_hat], [ref_hat], g, device)


def test_readme_shows_the_snippets():
    text = README.read_text()
    section = re.search(r"^## Porting your routing loop\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Porting your routing loop' section"
    for snippet in (SNIPPET_A, SNIPPET_B1, SNIPPET_B2, SNIPPET_C):
        assert snippet in section.group(1), f"README.md does not show: {snippet}"
