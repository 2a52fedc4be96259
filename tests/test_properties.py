"""Property tests (hypothesis) over random shapes, options and dtypes.

Against the reference: values and gradients on shapes drawn from three regimes (small odd
sizes: ones and primes, N_out = 1, D = 1; a large batch of few input capsules; few batch
elements of many input capsules), 1 to 10 iterations, every option and dtype. Besides, the
properties the math implies, which need no reference: batch elements are independent,
relabelling input or output capsules permutes the results, dynamic_routing equals route of the
predictions, c is a (leaky) distribution over the outputs and |v| < 1.

Examples are derandomised (the "ci" settings profile of conftest.py), so every run draws the
same ones; HYPOTHESIS_PROFILE=dev draws new ones.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import capsroute
from capsroute import reference
from conftest import (DEVICES, DTYPES, OPS, TOL, Shape, assert_close_rel, hypothesis_examples,
                      make_generator, make_route_inputs, make_routing_inputs, run_case)

SMALL = st.sampled_from([1, 2, 3, 5, 7, 11, 13])


@st.composite
def shapes(draw) -> Shape:
    regime = draw(st.sampled_from(["small", "wide_batch", "many_inputs"]))
    if regime == "small":
        B, N_in = draw(SMALL), draw(SMALL)
    elif regime == "wide_batch":
        B, N_in = draw(st.integers(24, 97)), draw(st.integers(1, 3))
    else:
        B, N_in = draw(st.integers(1, 2)), draw(st.integers(40, 331))
    N_out = draw(st.sampled_from([1, 2, 3, 5, 7, 10]))
    D_in = draw(st.sampled_from([1, 2, 3, 5, 8]))
    D_out = draw(st.sampled_from([1, 2, 3, 7, 16]))
    return Shape(B, N_in, N_out, D_in, D_out)


@settings(max_examples=hypothesis_examples(120))
@given(
    op=st.sampled_from(OPS),
    shape=shapes(),
    iterations=st.integers(1, 10),
    bias=st.booleans(),
    leaky=st.booleans(),
    detach=st.booleans(),
    return_coupling=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    device=st.sampled_from(DEVICES),
)
def test_matches_reference(op, shape, iterations, bias, leaky, detach, return_coupling, dtype,
                           device):
    run_case(op, shape, dtype, device, iterations=iterations, bias=bias, leaky=leaky,
             detach=detach, return_coupling=return_coupling, key=("hypothesis",))


def _inputs(op, shape, dtype, device, bias, key):
    gen = make_generator("property", op, tuple(shape), str(dtype), bias, *key)
    if op == "dynamic_routing":
        return make_routing_inputs(shape, dtype, device, bias=bias, gen=gen)
    return make_route_inputs(shape, dtype, device, bias=bias, gen=gen)


def _call(op, args, iterations, bias, leaky):
    return getattr(capsroute, op)(*args, iterations, bias=bias, leaky=leaky,
                                  return_coupling=True)


PROPERTY_ARGS = dict(
    op=st.sampled_from(OPS),
    shape=shapes(),
    iterations=st.integers(1, 6),
    bias=st.booleans(),
    leaky=st.booleans(),
    device=st.sampled_from(DEVICES),
)


@settings(max_examples=hypothesis_examples(40))
@given(**PROPERTY_ARGS)
def test_batch_elements_are_independent(op, shape, iterations, bias, leaky, device):
    """Routing one batch element alone gives what it gets within the batch."""
    x = _inputs(op, shape, torch.float64, device, bias, ("batch",))
    v, c = _call(op, x[:-1], iterations, x.bias, leaky)
    for b in sorted({0, shape.B - 1}):
        alone = [t[b:b + 1] for t in x[:-1]]
        if op == "dynamic_routing":
            alone[1] = x.weight
        v1, c1 = _call(op, alone, iterations, x.bias, leaky)
        assert_close_rel(v1[0], v[b], 1e-12, f"v[{b}]")
        assert_close_rel(c1[0], c[b], 1e-12, f"c[{b}]")


@settings(max_examples=hypothesis_examples(40))
@given(**PROPERTY_ARGS, data=st.data())
def test_relabelling_capsules_permutes_the_results(op, shape, iterations, bias, leaky, device,
                                                  data):
    """Routing does not depend on the order of the capsules: permuting the input capsules
    permutes c along i and leaves v alone; permuting the output capsules permutes v and c
    along j."""
    x = _inputs(op, shape, torch.float64, device, bias, ("perm",))
    p_in = torch.tensor(data.draw(st.permutations(range(shape.N_in))), device=device)
    p_out = torch.tensor(data.draw(st.permutations(range(shape.N_out))), device=device)
    v, c = _call(op, x[:-1], iterations, x.bias, leaky)
    if op == "dynamic_routing":
        args = [x.u[:, p_in], x.weight[p_in][:, p_out]]
    else:
        args = [x.u_hat[:, p_in][:, :, p_out]]
    b = x.bias[p_out] if bias else None
    vp, cp = _call(op, args, iterations, b, leaky)
    assert_close_rel(vp, v[:, p_out], 1e-12, "v")
    assert_close_rel(cp, c[:, p_in][:, :, p_out], 1e-12, "c")


@settings(max_examples=hypothesis_examples(40))
@given(shape=shapes(), iterations=st.integers(1, 10), bias=st.booleans(), leaky=st.booleans(),
       detach=st.booleans(), device=st.sampled_from(DEVICES))
def test_dynamic_routing_is_route_of_the_predictions(shape, iterations, bias, leaky, detach,
                                                     device):
    """dynamic_routing(u, W) = route(W u): values, and the gradients of u and W through the
    predictions (float64: in lower precision the two round the predictions differently,
    which routing can amplify)."""
    x = _inputs("dynamic_routing", shape, torch.float64, device, bias, ("pred",))
    u = x.u.detach().requires_grad_()
    w = x.weight.detach().requires_grad_()
    v, c = capsroute.dynamic_routing(u, w, iterations, bias=x.bias, leaky=leaky,
                                     detach=detach, return_coupling=True)
    v2, c2 = capsroute.route(reference.predictions(u, w), iterations, bias=x.bias,
                             leaky=leaky, detach=detach, return_coupling=True)
    tol = TOL[torch.float64]
    assert_close_rel(v, v2, tol, "v")
    assert_close_rel(c, c2, tol, "c")
    g = torch.randn(v.shape, generator=make_generator("pred-g"), dtype=torch.float64)
    g = g.to(device=device)
    gu, gw = torch.autograd.grad(v, [u, w], g)
    gu2, gw2 = torch.autograd.grad(v2, [u, w], g)
    assert_close_rel(gu, gu2, tol, "grad u")
    assert_close_rel(gw, gw2, tol, "grad weight")


@settings(max_examples=hypothesis_examples(40))
@given(**PROPERTY_ARGS, dtype=st.sampled_from(DTYPES))
def test_coupling_is_a_distribution_and_v_is_short(op, shape, iterations, bias, leaky, device,
                                                  dtype):
    """c[b, i, :] >= 0 sums to 1 over the outputs (below 1 with leaky routing: the leak takes
    the rest); |v| < 1."""
    x = _inputs(op, shape, dtype, device, bias, ("dist",))
    v, c = _call(op, x[:-1], iterations, x.bias, leaky)
    c = c.double()
    total = c.sum(dim=-1)
    slack = 4 * TOL[dtype] * shape.N_out
    assert (c >= 0).all()
    if leaky:
        assert (total < 1 + slack).all()
        assert (total > 0).all()
    else:
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=slack)
    assert (v.double().norm(dim=-1) < 1 + slack).all()


def test_ci_profile_is_derandomised():
    """CI reproducibility: the default profile draws the same examples on every run."""
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.deadline is None
