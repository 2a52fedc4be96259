"""pytest-benchmark comparisons of the fused op against the reference, canonical shape.

    python -m pytest benchmarks/test_bench.py                 # CPU, plus CUDA when present
    python -m pytest benchmarks/test_bench.py -k "cpu and fwd"
    python -m pytest benchmarks/test_bench.py --benchmark-compare   # against a saved run

Each group (device x pass) holds three rows, the fused op (`capsroute.dynamic_routing`), the
eager reference and `torch.compile(reference.dynamic_routing)`, so pytest-benchmark's table
shows them side by side. The canonical shape is the MNIST DigitCaps layer (N_in=1152,
D_in=8, N_out=10, D_out=16, 3 iterations, float32) at B=32 on CPU and B=128 on CUDA.
Inputs are fresh random tensors (never zeros); CUDA work is synchronised inside the timed
function. benchmarks/ratios.py prints the same comparison as one table of ratios.
"""
from __future__ import annotations

import pytest
import torch

import capsroute
from capsroute import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCH = {"cpu": 32, "cuda": 128}
N_IN, D_IN, N_OUT, D_OUT, ITERATIONS = 1152, 8, 10, 16, 3

_compiled = {}


def implementation(name: str, device: str, pass_name: str):
    if name == "fused":
        return capsroute.dynamic_routing
    if name == "eager":
        return reference.dynamic_routing
    # One compiled function per (device, pass): no_grad and grad-mode graphs differ.
    key = (device, pass_name)
    if key not in _compiled:
        _compiled[key] = torch.compile(reference.dynamic_routing)
    return _compiled[key]


def inputs(device: str):
    g = torch.Generator().manual_seed(0)
    B = BATCH[device]
    u = torch.randn(B, N_IN, D_IN, generator=g)
    W = torch.randn(N_IN, N_OUT, D_OUT, D_IN, generator=g) / (D_IN * N_IN) ** 0.5
    gv = torch.randn(B, N_OUT, D_OUT, generator=g)
    return u.to(device), W.to(device), gv.to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pass_name", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["fused", "eager", "compile"])
def test_dynamic_routing(benchmark, impl, pass_name, device):
    fn = implementation(impl, device, pass_name)
    u, W, gv = inputs(device)
    benchmark.group = f"{device} {pass_name} B={BATCH[device]}"
    benchmark.extra_info.update(impl=impl, device=device, B=BATCH[device])

    if pass_name == "fwd":
        def run():
            with torch.no_grad():
                v = fn(u, W, ITERATIONS)
            sync(device)
            return v
    else:
        u.requires_grad_()
        W.requires_grad_()

        def run():
            v = fn(u, W, ITERATIONS)
            grads = torch.autograd.grad(v, (u, W), gv)
            sync(device)
            return grads

    for _ in range(3):  # warm-up; compiles torch.compile's graph on the first call
        run()
    result = benchmark.pedantic(run, rounds=20 if device == "cpu" else 50, iterations=1,
                                warmup_rounds=2)
    assert result is not None

    # The timings mean nothing if the fused op does not compute the reference's numbers.
    if impl == "fused" and pass_name == "fwd":
        with torch.no_grad():
            expected = reference.dynamic_routing(u, W, ITERATIONS)
        torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5)
