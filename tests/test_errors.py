"""Bad input gets a clear error (DESIGN.md section 2): the right exception type, and a message
naming the argument, what was expected and what came. The same checks run in the C++ kernels
(eager) and in the fake kernels that torch.compile traces (capsroute/_ops.py); both are
tested here."""
from __future__ import annotations

import re
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch

import capsroute
from capsroute import _ops
from conftest import DEVICES, make_generator, randn

B, N_IN, N_OUT, D_IN, D_OUT = 3, 7, 5, 3, 11
# dtypes as the C++ checks print them, then as the Python (fake kernel) twins do
FLOAT = r"(Float|torch\.float32)"


def _dtype(cpp: str, py: str) -> str:
    return rf"({cpp}|torch\.{py})"


class Case(NamedTuple):
    id: str
    call: Callable  # (capsroute-like module, inputs dict) -> result
    exc: type
    match: str  # a regex the message must contain: argument, expectation, what came


def _inputs(device="cpu"):
    gen = make_generator("errors")
    return dict(
        u=randn((B, N_IN, D_IN), gen, dtype=torch.float32, device=device),
        weight=randn((N_IN, N_OUT, D_OUT, D_IN), gen, dtype=torch.float32, device=device,
                     scale=0.3),
        bias=randn((N_OUT, D_OUT), gen, dtype=torch.float32, device=device),
        u_hat=randn((B, N_IN, N_OUT, D_OUT), gen, dtype=torch.float32, device=device),
    )


def dr(u=None, weight=None, iterations=3, **kw):
    """dynamic_routing with the valid inputs unless replaced."""
    def call(x):
        return capsroute.dynamic_routing(x["u"] if u is None else u(x),
                                         x["weight"] if weight is None else weight(x),
                                         iterations, **{k: f(x) if callable(f) else f
                                                        for k, f in kw.items()})
    return call


def rt(u_hat=None, iterations=3, **kw):
    """route with the valid inputs unless replaced."""
    def call(x):
        return capsroute.route(x["u_hat"] if u_hat is None else u_hat(x), iterations,
                               **{k: f(x) if callable(f) else f for k, f in kw.items()})
    return call


ERROR_CASES = [
    # --- ranks
    Case("dr-u-2d", dr(u=lambda x: x["u"][0]), ValueError,
         r"expected u to be a 3-D tensor \[B, N_in, D_in\], but got a 2-D tensor of shape "
         r"\[7, 3\]"),
    Case("dr-u-4d", dr(u=lambda x: x["u"][None]), ValueError,
         r"expected u to be a 3-D tensor .*but got a 4-D tensor of shape \[1, 3, 7, 3\]"),
    Case("dr-u-0d", dr(u=lambda x: x["u"][0, 0, 0]), ValueError,
         r"expected u to be a 3-D tensor .*but got a 0-D tensor of shape \[\]"),
    Case("dr-weight-3d", dr(weight=lambda x: x["weight"][0]), ValueError,
         r"expected weight to be a 4-D tensor \[N_in, N_out, D_out, D_in\], but got a 3-D "
         r"tensor of shape \[5, 11, 3\]"),
    Case("dr-bias-1d", dr(bias=lambda x: x["bias"][0]), ValueError,
         r"expected bias to be a 2-D tensor \[N_out, D_out\], but got a 1-D tensor of shape "
         r"\[11\]"),
    Case("dr-bias-3d", dr(bias=lambda x: x["bias"][None]), ValueError,
         r"expected bias to be a 2-D tensor .*but got a 3-D tensor of shape \[1, 5, 11\]"),
    Case("rt-u_hat-3d", rt(u_hat=lambda x: x["u_hat"][0]), ValueError,
         r"expected u_hat to be a 4-D tensor \[B, N_in, N_out, D_out\], but got a 3-D tensor "
         r"of shape \[7, 5, 11\]"),
    Case("rt-u_hat-5d", rt(u_hat=lambda x: x["u_hat"][None]), ValueError,
         r"expected u_hat to be a 4-D tensor .*but got a 5-D tensor of shape "
         r"\[1, 3, 7, 5, 11\]"),
    Case("rt-bias-1d", rt(bias=lambda x: x["bias"].flatten()), ValueError,
         r"expected bias to be a 2-D tensor .*but got a 1-D tensor of shape \[55\]"),
    # --- sizes
    Case("dr-weight-N_in", dr(weight=lambda x: x["weight"][:6]), ValueError,
         r"expected weight\.shape\[0\] == 7 \(N_in, from u\.shape\[1\]\), but got weight of "
         r"shape \[6, 5, 11, 3\]"),
    Case("dr-weight-D_in", dr(weight=lambda x: x["weight"][..., :2]), ValueError,
         r"expected weight\.shape\[3\] == 3 \(D_in, from u\.shape\[2\]\), but got weight of "
         r"shape \[7, 5, 11, 2\]"),
    Case("dr-weight-transposed", dr(weight=lambda x: x["weight"].transpose(2, 3)), ValueError,
         r"expected weight\.shape\[3\] == 3 \(D_in, from u\.shape\[2\]\), but got weight of "
         r"shape \[7, 5, 3, 11\]"),
    Case("dr-bias-N_out", dr(bias=lambda x: x["bias"][:4]), ValueError,
         r"expected bias\.shape\[0\] == 5 \(N_out\), but got bias of shape \[4, 11\]"),
    Case("dr-bias-D_out", dr(bias=lambda x: x["bias"][:, :10]), ValueError,
         r"expected bias\.shape\[1\] == 11 \(D_out\), but got bias of shape \[5, 10\]"),
    Case("dr-bias-transposed", dr(bias=lambda x: x["bias"].t()), ValueError,
         r"expected bias\.shape\[0\] == 5 \(N_out\), but got bias of shape \[11, 5\]"),
    Case("rt-bias-N_out", rt(bias=lambda x: x["bias"][:, :10]), ValueError,
         r"expected bias\.shape\[1\] == 11 \(D_out\), but got bias of shape \[5, 10\]"),
    Case("dr-N_in-0", dr(u=lambda x: x["u"][:, :0], weight=lambda x: x["weight"][:0]),
         ValueError,
         r"expected u\.shape\[1\] \(N_in\) to be at least 1, but got u of shape \[3, 0, 3\]"),
    Case("dr-D_in-0", dr(u=lambda x: x["u"][..., :0], weight=lambda x: x["weight"][..., :0]),
         ValueError,
         r"expected u\.shape\[2\] \(D_in\) to be at least 1, but got u of shape \[3, 7, 0\]"),
    Case("dr-N_out-0", dr(weight=lambda x: x["weight"][:, :0]), ValueError,
         r"expected weight\.shape\[1\] \(N_out\) to be at least 1, but got weight of shape "
         r"\[7, 0, 11, 3\]"),
    Case("dr-D_out-0", dr(weight=lambda x: x["weight"][:, :, :0]), ValueError,
         r"expected weight\.shape\[2\] \(D_out\) to be at least 1, but got weight of shape "
         r"\[7, 5, 0, 3\]"),
    Case("rt-N_in-0", rt(u_hat=lambda x: x["u_hat"][:, :0]), ValueError,
         r"expected u_hat\.shape\[1\] \(N_in\) to be at least 1, but got u_hat of shape "
         r"\[3, 0, 5, 11\]"),
    Case("rt-N_out-0", rt(u_hat=lambda x: x["u_hat"][:, :, :0]), ValueError,
         r"expected u_hat\.shape\[2\] \(N_out\) to be at least 1, but got u_hat of shape "
         r"\[3, 7, 0, 11\]"),
    Case("rt-D_out-0", rt(u_hat=lambda x: x["u_hat"][..., :0]), ValueError,
         r"expected u_hat\.shape\[3\] \(D_out\) to be at least 1, but got u_hat of shape "
         r"\[3, 7, 5, 0\]"),
    # --- dtypes
    Case("dr-weight-dtype", dr(weight=lambda x: x["weight"].double()), TypeError,
         rf"expected weight to have the dtype of u \({FLOAT}\), but got "
         + _dtype("Double", "float64")),
    Case("dr-bias-dtype", dr(bias=lambda x: x["bias"].half()), TypeError,
         rf"expected bias to have the dtype of u \({FLOAT}\), but got "
         + _dtype("Half", "float16")),
    Case("rt-bias-dtype", rt(bias=lambda x: x["bias"].bfloat16()), TypeError,
         rf"expected bias to have the dtype of u_hat \({FLOAT}\), but got "
         + _dtype("BFloat16", "bfloat16")),
    Case("dr-u-int", dr(u=lambda x: x["u"].long(), weight=lambda x: x["weight"].long()),
         TypeError,
         r"expected u to be float32, float64, float16 or bfloat16, but got "
         + _dtype("Long", "int64")),
    Case("dr-weight-int", dr(weight=lambda x: x["weight"].int()), TypeError,
         rf"expected weight to have the dtype of u \({FLOAT}\), but got "
         + _dtype("Int", "int32")),
    Case("dr-u-bool", dr(u=lambda x: x["u"] > 0, weight=lambda x: x["weight"] > 0), TypeError,
         r"expected u to be float32, .* but got " + _dtype("Bool", "bool")),
    Case("dr-u-complex", dr(u=lambda x: x["u"].to(torch.complex64),
                            weight=lambda x: x["weight"].to(torch.complex64)), TypeError,
         r"expected u to be float32, .* but got " + _dtype("ComplexFloat", "complex64")),
    Case("rt-u_hat-int", rt(u_hat=lambda x: x["u_hat"].to(torch.int16)), TypeError,
         r"expected u_hat to be float32, float64, float16 or bfloat16, but got "
         + _dtype("Short", "int16")),
    # --- options
    Case("dr-iterations-0", dr(iterations=0), ValueError, r"expected iterations >= 1, but got 0"),
    Case("dr-iterations-neg", dr(iterations=-2), ValueError,
         r"expected iterations >= 1, but got -2"),
    Case("rt-iterations-0", rt(iterations=0), ValueError, r"expected iterations >= 1, but got 0"),
    Case("dr-iterations-float", dr(iterations=2.5), TypeError,
         r"expected iterations to be an int, but got float"),
    Case("dr-iterations-integral-float", dr(iterations=3.0), TypeError,
         r"expected iterations to be an int, but got float"),
    Case("rt-iterations-str", rt(iterations="3"), TypeError,
         r"expected iterations to be an int, but got str"),
    Case("rt-iterations-bool", rt(iterations=True), TypeError,
         r"expected iterations to be an int, but got bool"),
    Case("dr-iterations-tensor", dr(iterations=torch.tensor(3)), TypeError,
         r"expected iterations to be an int, but got Tensor"),
    Case("dr-eps-nan", dr(eps=float("nan")), ValueError,
         r"expected eps to be finite and >= 0, but got nan"),
    Case("dr-eps-inf", dr(eps=float("inf")), ValueError,
         r"expected eps to be finite and >= 0, but got inf"),
    Case("rt-eps-neg-inf", rt(eps=float("-inf")), ValueError,
         r"expected eps to be finite and >= 0, but got -inf"),
    Case("rt-eps-nan", rt(eps=float("nan")), ValueError,
         r"expected eps to be finite and >= 0, but got nan"),
    Case("dr-eps-negative", dr(eps=-1e-3), ValueError,
         r"expected eps to be finite and >= 0, but got -0\.001"),
    Case("rt-eps-str", rt(eps="1e-8"), TypeError, r"expected eps to be a float, but got str"),
    Case("dr-iterations-numpy-float", dr(iterations=np.float64(3.0)), TypeError,
         r"expected iterations to be an int, but got float64"),
    Case("rt-eps-tensor", rt(eps=torch.tensor(1e-8)), TypeError,
         r"expected eps to be a float, but got Tensor"),
]


@pytest.mark.parametrize("op", ["dynamic_routing", "route"])
def test_numpy_scalars_are_taken(op):
    """iterations and eps of numpy's types (from a config file, say) are taken as ints and
    floats, as torch's own ops take them: the same result as with Python's."""
    x = _inputs()
    call = dr if op == "dynamic_routing" else rt
    want = call(iterations=2, eps=0.25)(x)
    for iterations, eps in [(np.int64(2), np.float64(0.25)), (np.int32(2), np.float32(0.25)),
                            (np.uint8(2), 0.25)]:
        assert torch.equal(call(iterations=iterations, eps=eps)(x), want), (iterations, eps)


def _op_name(case: Case) -> str:
    return "capsroute.dynamic_routing" if case.id.startswith("dr") else "capsroute.route"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.id)
def test_bad_input_raises_clear_error(case, device):
    x = _inputs(device)
    with pytest.raises(case.exc) as info:
        case.call(x)
    message = str(info.value)
    assert re.search(case.match, message), f"unexpected message: {message}"
    python_level = ("to be an int" in case.match) or ("eps to be a float" in case.match)
    if not python_level:  # the op's checks name the op first
        assert message.startswith(_op_name(case)), f"the op is not named: {message}"


@pytest.mark.parametrize("case", ERROR_CASES[:3] + ERROR_CASES[9:11] + [
    c for c in ERROR_CASES if c.id in ("dr-weight-dtype", "rt-u_hat-int", "dr-iterations-0",
                                       "rt-eps-nan", "dr-eps-negative", "dr-bias-N_out")
], ids=lambda c: c.id)
def test_bad_input_raises_under_compile(case):
    """The fake kernels that torch.compile traces check the same things and say the same:
    the error surfaces while compiling, carrying the original type and message."""
    torch._dynamo.reset()
    x = _inputs()
    compiled = torch.compile(lambda **kw: case.call(kw), fullgraph=True, backend="eager")
    with pytest.raises(Exception) as info:
        compiled(**x)
    message = str(info.value)
    assert re.search(case.match, message), f"unexpected message: {message}"
    # dynamo wraps the fake kernel's exception; its type is named in the message
    assert isinstance(info.value, case.exc) or f"{case.exc.__name__}(" in message, message


@pytest.mark.parametrize("case", [c for c in ERROR_CASES if c.exc is not TypeError
                                  or "dtype" in c.match or "float32, float64" in c.match],
                         ids=lambda c: c.id)
def test_fake_kernels_check_like_the_kernels(case):
    """Under FakeTensorMode the same cases raise the same exception with the same message
    as the C++ checks (the Python twins in capsroute/_ops.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = _inputs()
    with pytest.raises(case.exc) as eager:
        case.call(x)
    with FakeTensorMode() as mode:
        fx = {k: mode.from_tensor(v) for k, v in x.items()}
        with pytest.raises(case.exc) as fake:
            case.call(fx)
    assert re.search(case.match, str(fake.value)), str(fake.value)
    # the messages agree up to how a dtype is printed
    assert _normalise_dtypes(str(fake.value)) == _normalise_dtypes(str(eager.value))


_DTYPE_NAMES = {"Float": "float32", "Double": "float64", "Half": "float16",
                "BFloat16": "bfloat16", "Long": "int64", "Int": "int32", "Short": "int16",
                "Bool": "bool", "ComplexFloat": "complex64"}


def _normalise_dtypes(message: str) -> str:
    message = message.replace("torch.", "")
    for cpp, py in _DTYPE_NAMES.items():
        message = re.sub(rf"\b{cpp}\b", py, message)
    return message.strip()


# --- devices --------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["dynamic_routing", "route"])
def test_fake_kernels_check_devices(op):
    """Mismatched devices, seen by the fake kernels (no GPU needed: fake CUDA tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        u = torch.empty(B, N_IN, D_IN, device="cuda")
        w = torch.empty(N_IN, N_OUT, D_OUT, D_IN)
        b_cpu = torch.empty(N_OUT, D_OUT)
        u_hat = torch.empty(B, N_IN, N_OUT, D_OUT, device="cuda")
        with pytest.raises(RuntimeError, match=r"expected (weight|bias) to be on the device of "
                                               r"(u|u_hat) \(cuda:0\), but got cpu"):
            if op == "dynamic_routing":
                torch.ops.capsroute.dynamic_routing(u, w, None, 3, False, False, 1e-8, False)
            else:
                torch.ops.capsroute.route(u_hat, b_cpu, 3, False, False, 1e-8, False)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("case", ["weight", "bias", "u_hat-bias"])
def test_mismatched_devices(case):
    """One argument on the CPU, the others on the GPU: a RuntimeError naming the argument
    and both devices (a CPU-only build refuses every CUDA tensor instead)."""
    x = _inputs("cuda")
    if case == "weight":
        call = dr(weight=lambda x: x["weight"].cpu())
        match = r"capsroute\.dynamic_routing: expected weight to be on the device of u " \
                r"\(cuda:0\), but got cpu"
    elif case == "bias":
        call = dr(bias=lambda x: x["bias"].cpu())
        match = r"capsroute\.dynamic_routing: expected bias to be on the device of u " \
                r"\(cuda:0\), but got cpu"
    else:
        call = rt(bias=lambda x: x["bias"].cpu())
        match = r"capsroute\.route: expected bias to be on the device of u_hat " \
                r"\(cuda:0\), but got cpu"
    if not _ops.has_cuda_kernels():
        match = "built without CUDA kernels"
    with pytest.raises(RuntimeError, match=match):
        call(x)


# --- the backward ops -------------------------------------------------------------------------


def _backward_args(op: str):
    x = _inputs()
    if op == "dynamic_routing_backward":
        _, _, s = torch.ops.capsroute.dynamic_routing(x["u"], x["weight"], None, 3, False,
                                                      False, 1e-8, True)
        prefix = (x["u"], x["weight"])
    else:
        _, _, s = torch.ops.capsroute.route(x["u_hat"], None, 3, False, False, 1e-8, True)
        prefix = (x["u_hat"],)
    grad_v = torch.randn(B, N_OUT, D_OUT)
    grad_c = torch.randn(B, N_IN, N_OUT)
    return grad_v, grad_c, prefix, s


BACKWARD_CASES = [
    ("grad_v-shape", lambda gv, gc, s: (gv[..., :10], gc, s),
     r"expected grad_v of shape \[3, 5, 11\], but got \[3, 5, 10\]"),
    ("grad_v-rank", lambda gv, gc, s: (gv[0], gc, s),
     r"expected grad_v to be a 3-D tensor \[B, N_out, D_out\], but got a 2-D tensor"),
    ("grad_c-shape", lambda gv, gc, s: (gv, gc[..., :4], s),
     r"expected grad_c of shape \[3, 7, 5\], but got \[3, 7, 4\]"),
    ("s-iterations", lambda gv, gc, s: (gv, gc, s[:2]),
     r"expected s of shape \[3, 3, 5, 11\], but got \[2, 3, 5, 11\]"),
    ("s-rank", lambda gv, gc, s: (gv, gc, s[0]),
     r"expected s to be a 4-D tensor \[iterations, B, N_out, D_out\], but got a 3-D tensor"),
]


@pytest.mark.parametrize("fake", [False, True], ids=["kernel", "fake"])
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("op", ["dynamic_routing_backward", "route_backward"])
def test_backward_ops_check_their_inputs(op, case, fake):
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, change, match = case
    grad_v, grad_c, prefix, s = _backward_args(op)
    grad_v, grad_c, s = change(grad_v, grad_c, s)
    fn = getattr(torch.ops.capsroute, op)
    with pytest.raises(ValueError, match=rf"capsroute\.{op}: " + match):
        if fake:
            with FakeTensorMode(allow_non_fake_inputs=True):
                fn(grad_v, grad_c, *prefix, s, False, 3, False, False, 1e-8)
        else:
            fn(grad_v, grad_c, *prefix, s, False, 3, False, False, 1e-8)
