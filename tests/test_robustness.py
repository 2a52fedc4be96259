"""Robustness (issue 5): non-finite inputs, tiny and zero vectors, and index arithmetic past
2^31 predictions."""
from __future__ import annotations

import pytest
import torch

import capsroute
from capsroute import reference
from conftest import (DEVICES, DTYPES, GRAD_TOL, OPS, TOL, Shape, as_reference,
                      assert_close_rel, dtype_id, make_generator, make_route_inputs,
                      make_routing_inputs, randn)

SHAPE = Shape(4, 7, 5, 3, 11)

# --- NaN and Inf -----------------------------------------------------------------------------

# (op, the input the bad value goes into, the index it goes to)
BAD_SPOTS = [
    ("dynamic_routing", "u", (1, 2, 0)),        # one input capsule of batch element 1
    ("dynamic_routing", "weight", (3, 2, 4, 1)),  # one transform, all batch elements
    ("dynamic_routing", "bias", (1, 5)),         # one output capsule's bias
    ("route", "u_hat", (2, 6, 3, 7)),            # one prediction of batch element 2
    ("route", "bias", (4, 0)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("op,where,index", BAD_SPOTS, ids=lambda x: str(x))
def test_non_finite_inputs_propagate(op, where, index, iterations, value, dtype, device):
    """capsroute does not sanitise its inputs: a NaN or an Inf in u, weight, bias or u_hat
    makes the outputs that depend on it non-finite (never a plausible finite number), and
    exactly those: the non-finite entries of v, c and of every gradient are where the
    reference (float64, same inputs) has them, and the finite ones agree with it.

    What depends on what: one bad u[b, i] reaches every v[b, :] (through all the
    predictions u_hat[b, i, :]), one bad u_hat[b, i, j] reaches v[b, j]; from the second
    iteration, through the logits, all of v[b] and c[b], and never another batch element. A
    bad weight[i, j] or bias[j] reaches v[:, j], and from the second iteration all of v and
    c. The gradients spread the same way back."""
    gen = make_generator("nonfinite", op, where, iterations, value, str(dtype))
    if op == "dynamic_routing":
        inputs = make_routing_inputs(SHAPE, dtype, device, bias=True, gen=gen)
        names = ["u", "weight", "bias"]
    else:
        inputs = make_route_inputs(SHAPE, dtype, device, bias=True, gen=gen)
        names = ["u_hat", "bias"]
    inputs = [t.clone() for t in inputs]
    inputs[names.index(where)][index] = value
    leaves = [t.requires_grad_() for t in inputs]
    v, c = getattr(capsroute, op)(*leaves[:-1], iterations, bias=leaves[-1],
                                  return_coupling=True)
    ref_leaves = [as_reference(t) for t in leaves]
    v_ref, c_ref = getattr(reference, op)(*ref_leaves[:-1], iterations, bias=ref_leaves[-1],
                                          return_coupling=True)
    assert not torch.isfinite(v_ref).all(), "the case does not reach the output"

    def same_non_finite(out, ref, what, tol):
        bad, ref_bad = ~torch.isfinite(out.cpu()), ~torch.isfinite(ref)
        assert torch.equal(bad, ref_bad), (
            f"{what}: non-finite at {bad.sum().item()} entries, the reference at "
            f"{ref_bad.sum().item()}; first differing index "
            f"{(bad != ref_bad).nonzero()[0].tolist()}")
        if (~ref_bad).any():
            assert_close_rel(out.cpu()[~ref_bad], ref[~ref_bad], tol, f"{what}, finite part")

    same_non_finite(v, v_ref, "v", TOL[dtype])
    same_non_finite(c, c_ref, "c", TOL[dtype])
    if where in ("u", "u_hat"):  # other batch elements are untouched
        others = [b for b in range(SHAPE.B) if b != index[0]]
        assert torch.isfinite(v[others]).all() and torch.isfinite(c[others]).all()
        if where == "u" or iterations > 1:
            assert not torch.isfinite(v[index[0]]).any()
        else:
            j = index[2]
            assert not torch.isfinite(v[index[0], j]).any()
            assert torch.isfinite(v[index[0], [k for k in range(SHAPE.N_out) if k != j]]).all()

    g = randn(v.shape, gen, dtype=dtype, device=device)
    grads = torch.autograd.grad(v, leaves, g)
    ref_grads = torch.autograd.grad(v_ref, ref_leaves, as_reference(g))
    for name, gr, rg in zip(names, grads, ref_grads):
        same_non_finite(gr, rg, f"grad {name}", GRAD_TOL[dtype])


# --- tiny and zero vectors ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("eps", [1e-8, 1e-12])
@pytest.mark.parametrize("which", ["all", "some"])
@pytest.mark.parametrize("op", OPS)
def test_tiny_vectors(op, which, eps, dtype, device):
    """Input capsules of norm ~1e-20 (all of them, or some among normal ones): finite outputs
    and gradients for eps > 0, and in float64 the reference's values. (In half precision
    1e-20 is below the smallest subnormal of float16: the vectors are then zero.)"""
    gen = make_generator("tiny", op, which, eps, str(dtype))
    if op == "dynamic_routing":
        inputs = make_routing_inputs(SHAPE, torch.float64, device, bias=False, gen=gen)
        x = inputs.u
    else:
        inputs = make_route_inputs(SHAPE, torch.float64, device, bias=False, gen=gen)
        x = inputs.u_hat
    if which == "all":
        x.mul_(1e-20)
    else:
        x[:, ::2] *= 1e-20
    leaves = [t.to(dtype).requires_grad_() for t in inputs[:-1]]
    for iterations in (1, 3):
        v, c = getattr(capsroute, op)(*leaves, iterations, eps=eps, return_coupling=True)
        g = randn(v.shape, gen, dtype=dtype, device=device)
        grads = torch.autograd.grad(v, leaves, g)
        for t in [v, c] + list(grads):
            assert torch.isfinite(t).all()
        assert (v.double().norm(dim=-1) < 1).all()
        ref_leaves = [as_reference(t) for t in leaves]
        v_ref, c_ref = getattr(reference, op)(*ref_leaves, iterations, eps=eps,
                                              return_coupling=True)
        ref_grads = torch.autograd.grad(v_ref, ref_leaves, as_reference(g))
        if dtype == torch.float64 or which == "some":
            # tiny capsules among normal ones hardly matter; all tiny is exact in float64
            assert_close_rel(v, v_ref, TOL[dtype], "v")
            assert_close_rel(c, c_ref, TOL[dtype], "c")
            if dtype == torch.float64:
                for gr, rg in zip(grads, ref_grads):
                    assert_close_rel(gr, rg, GRAD_TOL[dtype], "grad")
        else:
            # v ~ |s|^2 s / sqrt(eps) underflows in low precision: v is (nearly) zero, c
            # uniform
            assert v.double().abs().max() < 1e-30
            torch.testing.assert_close(c.double().cpu(), c_ref, rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op", OPS)
def test_zero_vectors_all_options(op, dtype, device):
    """Every input capsule zero, with every option: v = 0 exactly (squash(0) = 0), c
    uniform, gradients finite (zero, except through the bias), for eps > 0."""
    shape = SHAPE
    gen = make_generator("zero-all", op, str(dtype))
    if op == "dynamic_routing":
        inputs = make_routing_inputs(shape, dtype, device, bias=True, gen=gen)
        x = inputs.u
    else:
        inputs = make_route_inputs(shape, dtype, device, bias=True, gen=gen)
        x = inputs.u_hat
    x.zero_()
    for iterations in (1, 3):
        for leaky in (False, True):
            for detach in (False, True):
                leaves = [t.detach().requires_grad_() for t in inputs[:-1]]
                v, c = getattr(capsroute, op)(*leaves, iterations, leaky=leaky, detach=detach,
                                              return_coupling=True)
                assert torch.equal(v, torch.zeros_like(v))
                uniform = 1 / (shape.N_out + (1 if leaky else 0))
                torch.testing.assert_close(c.double(), torch.full(c.shape, uniform,
                                           dtype=torch.float64, device=device),
                                           rtol=TOL[dtype], atol=0)
                grads = torch.autograd.grad(v, leaves, torch.ones_like(v))
                for gr in grads:
                    assert torch.isfinite(gr).all()
                # with a bias s = bias: the gradient reaches the bias and stays finite
                b = inputs.bias.detach().requires_grad_()
                vb = getattr(capsroute, op)(*leaves, iterations, bias=b, leaky=leaky,
                                            detach=detach)
                gb = torch.autograd.grad(vb, [*leaves, b], torch.ones_like(vb))
                for gr in gb:
                    assert torch.isfinite(gr).all()
                assert gb[-1].abs().sum() > 0


# --- index arithmetic past 2^31 predictions ------------------------------------------------------

# B * N_in * N_out * D_out just past 2^31, with the MNIST DigitCaps sizes per batch element.
N_IN, N_OUT, D_OUT = 1152, 10, 16
BIG_B = 2**31 // (N_IN * N_OUT * D_OUT) + 1  # 11652
assert BIG_B * N_IN * N_OUT * D_OUT > 2**31 > (BIG_B - 1) * N_IN * N_OUT * D_OUT

_big_devices = [pytest.param("cpu", marks=pytest.mark.slow)] + \
    [pytest.param("cuda") for d in DEVICES if d == "cuda"]


def _batch_scales(B, device):
    # A different scale per batch element: a read from the wrong batch element shows.
    return torch.linspace(0.5, 1.5, B, dtype=torch.float32, device=device)


@pytest.mark.parametrize("device", _big_devices)
def test_dynamic_routing_past_2_31_predictions(device):
    """u_hat is never stored, so this is cheap in memory; batch elements are independent, so
    the first, a middle and the last (whose predictions lie past index 2^31) are checked
    against the reference run on that element alone, values and the gradient of u."""
    gen = make_generator("big-dr")
    D_in = 1
    base = randn((7, N_IN, D_in), gen, dtype=torch.float32)
    idx = torch.arange(BIG_B) % 7
    u = (base[idx] * _batch_scales(BIG_B, "cpu")[:, None, None]).to(device)
    w = randn((N_IN, N_OUT, D_OUT, D_in), gen, dtype=torch.float32, device=device,
              scale=4 * N_OUT / (D_OUT * N_IN) ** 0.5)
    u.requires_grad_()
    v, c = capsroute.dynamic_routing(u, w, 2, return_coupling=True)
    g_v = torch.ones_like(v)
    (g_u,) = torch.autograd.grad(v, u, g_v)
    for b in (0, BIG_B // 2, BIG_B - 1):
        ub = as_reference(u[b:b + 1]).requires_grad_()
        v_ref, c_ref = reference.dynamic_routing(ub, as_reference(w), 2, return_coupling=True)
        (g_ref,) = torch.autograd.grad(v_ref, ub, torch.ones_like(v_ref))
        assert_close_rel(v[b:b + 1], v_ref, TOL[torch.float32], f"v[{b}]")
        assert_close_rel(c[b:b + 1], c_ref, TOL[torch.float32], f"c[{b}]")
        assert_close_rel(g_u[b:b + 1], g_ref, GRAD_TOL[torch.float32], f"grad u[{b}]")
    assert torch.isfinite(v).all() and torch.isfinite(g_u).all()


@pytest.mark.parametrize("device", _big_devices)
def test_route_past_2_31_predictions(device):
    """u_hat itself has more than 2^31 elements (4.3 GB in bfloat16): the last batch
    elements lie past index 2^31. Values and the gradient of u_hat of a few batch elements
    against the reference run on that element alone."""
    gen = make_generator("big-route")
    dtype = torch.bfloat16
    base = randn((7, N_IN, N_OUT, D_OUT), gen, dtype=torch.float32,
                 scale=4 * N_OUT / (D_OUT * N_IN) ** 0.5).to(device)
    scales = _batch_scales(BIG_B, device)
    u_hat = torch.empty(BIG_B, N_IN, N_OUT, D_OUT, dtype=dtype, device=device)
    for b0 in range(0, BIG_B, 1024):  # fill in pieces: no float32 copy of the whole
        b1 = min(BIG_B, b0 + 1024)
        idx = torch.arange(b0, b1, device=device) % 7
        u_hat[b0:b1] = (base[idx] * scales[b0:b1, None, None, None]).to(dtype)
    assert u_hat.numel() > 2**31
    check = (0, BIG_B // 2, BIG_B - 1)
    u_hat.requires_grad_()
    v = capsroute.route(u_hat, 2)
    (g,) = torch.autograd.grad(v, u_hat, torch.ones_like(v))
    for b in check:
        hb = as_reference(u_hat[b:b + 1]).requires_grad_()
        v_ref = reference.route(hb, 2)
        (g_ref,) = torch.autograd.grad(v_ref, hb, torch.ones_like(v_ref))
        assert_close_rel(v[b:b + 1], v_ref, TOL[dtype], f"v[{b}]")
        assert_close_rel(g[b:b + 1], g_ref, GRAD_TOL[dtype], f"grad u_hat[{b}]")
    assert torch.isfinite(v).all()


# --- long float32 sums on the matrix units ----------------------------------------------------

# The GPU's matrix units round their float32 sums toward zero, so the CUDA kernels add every
# product to its sum with ordinary float32 adds (mma_split_add): sums kept in the units'
# accumulators drifted by 1e-6 to 1e-5 (v at 1.09e-5 past 2^31 predictions on an H100; the
# CUDA emulation measures the same in test_long_sums_float32). Each case runs one long sum, in
# one iteration (uniform couplings: the sums themselves, not the routing's conditioning):
# - B = 4096, MNIST capsules: each block sums a few hundred input capsules (the batch fills
#   the GPU, so few blocks share N_in); the first batch elements are checked, each against
#   the reference run on it alone;
# - B = 4096, N_in = 4: grad_W sums 64 batch tiles per warp; the whole batch is checked;
# - D_in = 1024: every prediction sums 128 chunks of 8 input dims.
# The CPU kernels (rounded to nearest) land under 3e-7 on v and grad u, and at 8e-7 and 1e-6 on
# grad weight and grad bias (4096-term sums); the bounds are 1e-6 and 2.5e-6. Kept in the
# accumulators, the emulation's sums erred by 2e-6 to 8e-6 on such shapes.
LONG_SUMS = [(Shape(4096, 1152, 10, 8, 16), 4), (Shape(4096, 4, 10, 8, 16), None),
             (Shape(8, 8, 10, 1024, 16), None)]


@pytest.mark.skipif("cuda" not in DEVICES, reason="the matrix units are the GPU's")
@pytest.mark.parametrize("shape,checked", LONG_SUMS, ids=lambda x: str(x))
def test_long_float32_sums_cuda(shape, checked, device="cuda"):
    gen = make_generator("long-sums", tuple(shape))
    ins = make_routing_inputs(shape, torch.float32, device, bias=True, gen=gen)
    u, w, b = (t.detach().requires_grad_() for t in ins)
    v = capsroute.dynamic_routing(u, w, 1, bias=b)
    g_v = randn(v.shape, gen, dtype=torch.float32, device=device)
    grads = torch.autograd.grad(v, (u, w, b), g_v)
    n = checked or shape.B  # batch elements are independent: check the first n
    refs = [as_reference(t[:n] if t is u else t).requires_grad_() for t in (u, w, b)]
    v_ref = reference.dynamic_routing(refs[0], refs[1], 1, bias=refs[2])
    grads_ref = torch.autograd.grad(v_ref, refs, as_reference(g_v[:n]))
    assert_close_rel(v[:n], v_ref, 1e-6, "v")
    assert_close_rel(grads[0][:n], grads_ref[0], 1e-6, "grad u")
    if checked is None:  # grad_weight and grad_bias sum over the whole batch
        assert_close_rel(grads[1], grads_ref[1], 2.5e-6, "grad weight")
        assert_close_rel(grads[2], grads_ref[2], 2.5e-6, "grad bias")
