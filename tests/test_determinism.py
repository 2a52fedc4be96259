"""Determinism (issue 5): bit-identical values and gradients across repeated runs, across CPU
thread counts, and from several Python threads at once; on CUDA across runs and on a
non-default stream, and replayed from a CUDA graph."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import capsroute
from conftest import (DEVICES, DTYPES, OPS, Shape, assert_close_rel, dtype_id,
                      make_generator, make_route_inputs, make_routing_inputs, randn)

# N_in past the CPU kernel's 32 chunks, an odd batch: every parallel loop has several pieces.
SHAPE = Shape(6, 67, 10, 8, 16)


def _problem(op, dtype, device, key=(), shape=SHAPE):
    gen = make_generator("determinism", op, str(dtype), *key)
    if op == "dynamic_routing":
        inputs = make_routing_inputs(shape, dtype, device, bias=True, gen=gen)
    else:
        inputs = make_route_inputs(shape, dtype, device, bias=True, gen=gen)
    g_v = randn((shape.B, shape.N_out, shape.D_out), gen, dtype=dtype, device=device)
    g_c = randn((shape.B, shape.N_in, shape.N_out), gen, dtype=dtype, device=device)
    return inputs, g_v, g_c


def _run(op, inputs, g_v, g_c, iterations=3, detach=False):
    """v, c and every input's gradient (through v and c)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    v, c = getattr(capsroute, op)(*leaves[:-1], iterations, bias=leaves[-1], leaky=True,
                                  detach=detach, return_coupling=True)
    outs, gs = ([v, c], [g_v, g_c]) if c.requires_grad else ([v], [g_v])
    grads = torch.autograd.grad(outs, leaves, gs)
    return [v.detach(), c.detach()] + list(grads)


def _assert_identical(a, b, what):
    names = ["v", "c"] + [f"grad {i}" for i in range(len(a) - 2)]
    for name, x, y in zip(names, a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        # equal bit patterns (torch.equal would pass -0.0 == 0.0 and fail NaN == NaN)
        assert torch.equal(x.view(_int_view(x.dtype)), y.view(_int_view(y.dtype))), \
            f"{what}: {name} differs"


def _int_view(dtype):
    return {torch.float64: torch.int64, torch.float32: torch.int32,
            torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("detach", [False, True], ids=["exact", "detach"])
@pytest.mark.parametrize("op", OPS)
def test_repeated_runs_are_bit_identical(op, detach, dtype, device):
    inputs, g_v, g_c = _problem(op, dtype, device)
    first = _run(op, inputs, g_v, g_c, detach=detach)
    for k in range(3):
        _assert_identical(first, _run(op, inputs, g_v, g_c, detach=detach), f"run {k + 2}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("op", OPS)
def test_thread_count_does_not_change_results(op, dtype, restore_threads):
    """CPU: 1, 2 and 3 intra-op threads (3 splits the work unevenly) give the same bits."""
    inputs, g_v, g_c = _problem(op, dtype, "cpu")
    torch.set_num_threads(1)
    one = _run(op, inputs, g_v, g_c)
    for n in (2, 3):
        torch.set_num_threads(n)
        assert torch.get_num_threads() == n
        _assert_identical(one, _run(op, inputs, g_v, g_c), f"{n} threads vs 1")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_concurrent_calls_from_python_threads(op, device):
    """Several Python threads calling the op at once (forward and backward, each on its own
    problem) get what serial calls get."""
    problems = [_problem(op, torch.float32, device, key=(k,)) for k in range(6)]
    serial = [_run(op, *p) for p in problems]
    barrier = threading.Barrier(len(problems))

    def work(p):
        barrier.wait(timeout=60)  # start together
        return [_run(op, *p) for _ in range(2)]

    with ThreadPoolExecutor(max_workers=len(problems)) as pool:
        results = list(pool.map(work, problems))
    for k, (want, got) in enumerate(zip(serial, results)):
        for run in got:
            _assert_identical(want, run, f"thread {k}")


@pytest.mark.parametrize("iterations", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("op", OPS)
def test_cpu_kept_couplings_give_the_recomputed_bits(op, dtype, iterations, monkeypatch):
    """The CPU backward keeps its sweep's couplings and logits' gradients (iterations 2..r)
    for its last pass, within CAPSROUTE_COUPLING_CACHE_MB (1024 MiB unless set), instead of
    recomputing them there from the predictions; with 0, or a cap the call does not fit (1 MiB;
    here 2.2 MB per kept iteration in float32), it recomputes. All give the same bits. A value
    that is not a number of MiB is refused, as on CUDA."""
    shape = Shape(40, 700, 10, 8, 16)
    inputs, g_v, g_c = _problem(op, dtype, "cpu", key=("kept",), shape=shape)
    kept = _run(op, inputs, g_v, g_c, iterations)
    for cache_mb in ("0", "1"):
        monkeypatch.setenv("CAPSROUTE_COUPLING_CACHE_MB", cache_mb)
        _assert_identical(kept, _run(op, inputs, g_v, g_c, iterations), f"cache {cache_mb} MiB")
    monkeypatch.setenv("CAPSROUTE_COUPLING_CACHE_MB", "1GB")
    with pytest.raises(ValueError, match="CAPSROUTE_COUPLING_CACHE_MB must be a whole number"):
        _run(op, inputs, g_v, g_c, iterations)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("op", OPS)
def test_cuda_side_stream_is_honoured(op):
    """The op runs on the current stream: on a side stream whose inputs are written after a
    long sleep, a kernel launched on another stream would read them before they exist."""
    from capsroute import _ops

    if not _ops.has_cuda_kernels():
        pytest.skip("needs CUDA kernels (this build is CPU-only)")
    inputs, g_v, g_c = _problem(op, torch.float32, "cuda")
    want = _run(op, inputs, g_v, g_c)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the inputs exist
        fresh = [t * 1 for t in inputs]  # written on the side stream, after the sleep
        got = _run(op, fresh, g_v, g_c)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _assert_identical(want, got, "side stream")
    # and against the CPU kernels, within float32 tolerance
    cpu = _run(op, [t.cpu() for t in inputs], g_v.cpu(), g_c.cpu())
    for x, y in zip(got, cpu):
        assert_close_rel(x, y, 1e-5, "side stream vs CPU")


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("cache_mb", ["1024", "0"], ids=["kept", "recomputed"])
@pytest.mark.parametrize("detach", [False, True], ids=["exact", "detach"])
@pytest.mark.parametrize("shape", [SHAPE, Shape(5, 41, 20, 8, 16)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_replay_matches_eager(op, shape, detach, cache_mb, monkeypatch):
    """Forward and backward captured in one CUDA graph: the capture succeeds (no host
    synchronisation, no host read of device values inside the ops), and a replay on new
    inputs, copied into the captured ones, gives the bits of an eager call on those inputs.
    20 output capsules make two groups (statistics passes); cache_mb=0 makes the backward's
    last pass recompute the couplings instead of reading the kept ones."""
    from capsroute import _ops

    if not _ops.has_cuda_kernels():
        pytest.skip("needs CUDA kernels (this build is CPU-only)")
    monkeypatch.setenv("CAPSROUTE_COUPLING_CACHE_MB", cache_mb)
    inputs, g_v, g_c = _problem(op, torch.float32, "cuda", key=("graph", str(shape)), shape=shape)
    new_inputs, new_g_v, new_g_c = _problem(op, torch.float32, "cuda",
                                            key=("graph, new", str(shape)), shape=shape)
    static = [t.clone() for t in list(inputs) + [g_v, g_c]]
    side = torch.cuda.Stream()  # warm-up on a side stream, as capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _run(op, static[:-2], *static[-2:], detach=detach)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _run(op, static[:-2], *static[-2:], detach=detach)
    for dst, src in zip(static, list(new_inputs) + [new_g_v, new_g_c]):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    want = _run(op, list(new_inputs), new_g_v, new_g_c, detach=detach)
    assert not torch.equal(want[0], _run(op, list(inputs), g_v, g_c, detach=detach)[0])
    _assert_identical(want, captured, "CUDA graph replay")
