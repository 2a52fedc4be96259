"""Where the fused op's time goes on a GPU: per-kernel CUDA times (torch.profiler) of one
forward and one forward+backward of capsroute.dynamic_routing (or, with --op route, of
capsroute.route on the predictions W u), and beside them the wall time
of a call with its synchronisation, so that host overhead (launches, allocations) shows as
the gap between the two; and the time per call of back-to-back calls, eagerly and replayed
from a CUDA graph (no host work): where the eager one is longer, the calls wait on the host.
A diagnostic for kernel work, not the benchmark (benchmarks/ratios.py).

    python scripts/profile_cuda.py [--op dynamic_routing|route] [--batch 128] [--n-in 1152]
                                   [--n-out 10] [--dtype float32] [--host]
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import capsroute

p = argparse.ArgumentParser()
p.add_argument("--op", default="dynamic_routing", choices=["dynamic_routing", "route"])
p.add_argument("--batch", type=int, default=128)
p.add_argument("--n-in", type=int, default=1152)
p.add_argument("--n-out", type=int, default=10)
p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
p.add_argument("--calls", type=int, default=20)
p.add_argument("--host", action="store_true",
               help="only the host side of a forward+backward: the host time of its pieces, "
                    "then CPU time per operator and runtime call (torch.profiler), to find "
                    "where back-to-back calls wait")
args = p.parse_args()

dtype = getattr(torch, args.dtype)
gen = torch.Generator(device="cuda").manual_seed(0)
u = torch.randn(args.batch, args.n_in, 8, device="cuda", dtype=dtype, generator=gen)
W = (torch.randn(args.n_in, args.n_out, 16, 8, device="cuda", dtype=dtype, generator=gen)
     * (8 * args.n_in) ** -0.5 * 4).requires_grad_()
u.requires_grad_()
gv = torch.randn(args.batch, args.n_out, 16, device="cuda", dtype=dtype, generator=gen)
if args.op == "route":  # route's input: the predictions, [B, N_in, N_out, 16]
    with torch.no_grad():
        u_hat = torch.einsum("ijdk,bik->bijd", W, u).requires_grad_()
    call, inputs = (lambda: capsroute.route(u_hat, 3)), (u_hat,)
else:
    call, inputs = (lambda: capsroute.dynamic_routing(u, W, 3)), (u, W)


def forward():
    with torch.no_grad():
        call()


def forward_backward():
    torch.autograd.grad(call(), inputs, gv)


def host_split():
    """The host's time per call (no profiler: it inflates every operator) of the pieces of a
    forward+backward, each run back to back: the machine's unit costs (a launch, an
    allocation, the op with nothing to launch), the raw ops without autograd, the forward
    without and with its graph, the whole forward+backward, and torch.autograd.grad of a
    one-kernel CUDA graph (the engine's own cost, which hands CUDA backward work to a device
    thread). Where the whole is longer than its pieces, the difference is waiting."""
    ops = torch.ops.capsroute
    x = torch.randn(1024, device="cuda", requires_grad=True)
    with torch.no_grad():
        if args.op == "route":
            raw = (u_hat.detach(),)
            _, _, s = ops.route(*raw, None, 3, False, False, 1e-8, False)
            fwd = lambda: ops.route(*raw, None, 3, False, False, 1e-8, False)
            bwd = lambda: ops.route_backward(gv, None, *raw, s, False, 3, False, False, 1e-8)
            no_batch = raw[0][:0]
            fixed = lambda: ops.route(no_batch, None, 3, False, False, 1e-8, False)
        else:
            raw = (u.detach(), W.detach())
            _, _, s = ops.dynamic_routing(*raw, None, 3, False, False, 1e-8, False)
            fwd = lambda: ops.dynamic_routing(*raw, None, 3, False, False, 1e-8, False)
            bwd = lambda: ops.dynamic_routing_backward(gv, None, *raw, s, False, 3, False,
                                                       False, 1e-8)
            no_batch = raw[0][:0]
            fixed = lambda: ops.dynamic_routing(no_batch, raw[1], None, 3, False, False, 1e-8,
                                                False)
    y = torch.zeros(16, device="cuda")
    # The machine's unit costs first: one small launch through the dispatcher, one allocation,
    # and the op with B = 0 (its checks, device guard and output allocations, no launch).
    pieces = [("y.add_(1): one launch", lambda: y.add_(1)),
              ("torch.empty(1 MiB) on CUDA: one allocation",
               lambda: torch.empty(1 << 18, device="cuda")),
              ("raw forward op with B = 0 (no launch)", fixed),
              ("raw forward op (no autograd)", fwd),
              ("raw backward op", bwd),
              ("forward under torch.no_grad", forward),
              ("forward, building the autograd graph", call),
              ("forward+backward (torch.autograd.grad)", forward_backward),
              ("torch.autograd.grad of (x * 2).sum() on CUDA", lambda: torch.autograd.grad(
                  (x * 2).sum(), x))]
    print(f"\n== host time per call of {args.op}'s pieces, B={args.batch} {args.dtype} "
          f"(median of 5 runs of {args.calls} calls back to back)")
    for name, fn in pieces:
        runs = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            runs.append((time.perf_counter() - t0) / args.calls * 1e6)
        torch.cuda.synchronize()
        runs = sorted(runs[1:])  # the first run warms up
        print(f"  {runs[2]:8.1f} us  (min {runs[0]:.1f}, max {runs[-1]:.1f})  {name}")


if args.host:
    for _ in range(5):
        forward_backward()
    torch.cuda.synchronize()
    host_split()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            forward_backward()
        torch.cuda.synchronize()
    print(f"\n== host side of {args.op} forward+backward, B={args.batch}: totals over "
          f"{args.calls} calls back to back")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                    max_name_column_width=60))
    raise SystemExit

for name, fn in [("forward", forward), ("forward+backward", forward_backward)]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        fn()
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) / args.calls * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernel_us = sum(e.device_time_total for e in events) / args.calls
    print(f"\n== {args.op} {name}, B={args.batch} N_in={args.n_in} N_out={args.n_out} "
          f"{args.dtype}: wall {wall_us:.1f} us per call (with sync), GPU busy {kernel_us:.1f} us")
    for e in sorted(events, key=lambda e: -e.device_time_total):
        print(f"  {e.device_time_total / args.calls:9.1f} us  {e.count / args.calls:4.1f}x  {e.key[:100]}")

    # Back to back (no synchronisation between calls), eagerly and as a CUDA graph replay;
    # also the host's time to enqueue the calls (until the last returns, before the sync).
    def per_call(run):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            run()
        host_us = (time.perf_counter() - t0) / args.calls * 1e6
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.calls * 1e3, host_us

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:
        print(f"  back to back: the CUDA graph capture failed: {e}")
        continue
    (eager_us, host_us), (graph_us, _) = per_call(fn), per_call(graph.replay)
    print(f"  back to back: eager {eager_us:.1f} us per call, CUDA graph replay {graph_us:.1f} us "
          f"(host-bound by {max(0.0, eager_us - graph_us):.1f} us); the host enqueues a call "
          f"in {host_us:.1f} us")
