"""A/B of the CUDA kernels' environment switches, side by side in one process.

Each switch (CAPSROUTE_ROW_DIRECT, CAPSROUTE_ROW_PASS, ...) is read by the launch code at
every launch, so one process can time every setting on the same inputs, taking turns in
rounds, where a process per setting (scripts/profile_cuda.py, as scripts/gpu_session.sh's A/B
steps ran it until now, ~40 s each) spent most of its time starting. For each shape it first
checks that every setting gives the results of the first one (the forward's v and the
gradients of u and W), then times, per setting, the forward and the forward+backward
replayed from a CUDA graph (the GPU's work alone) and the eager forward+backward (with the
host's launches); with --kernels also the GPU time of each kernel (torch.profiler). On CPU
the switches change nothing (the CPU kernels read none): there it times eager calls, which
tests the tool.

    python benchmarks/switches.py CAPSROUTE_ROW_DIRECT=0,1
    python benchmarks/switches.py CAPSROUTE_ROW_DIRECT=0,1 --batch 128 32 512 --kernels
    python benchmarks/switches.py CAPSROUTE_CAPSULE_GRAD=0,-,5 --batch 32   # "-": unset
    CAPSROUTE_ROW_PASS=1 python benchmarks/switches.py CAPSROUTE_ROW_DIRECT=0,1 --dtype bfloat16

Several switches give every combination of their values. A setting's time is the median
over the rounds (each round times every setting once, in an order rotated from round to
round); the spread is the smallest and largest of them.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import capsroute
from ratios import (DTYPES, Config, device_name, fwd_bwd_fn, forward_fn, make_inputs, sync,
                    time_cpu, time_cuda, time_cuda_graph)

Setting = Tuple[Tuple[str, Optional[str]], ...]  # ((name, value or None: unset), ...)


def parse_switch(spec: str) -> List[Tuple[str, Optional[str]]]:
    """"NAME=a,b,-" -> [(NAME, "a"), (NAME, "b"), (NAME, None)]."""
    name, sep, values = spec.partition("=")
    if not sep or not name.startswith("CAPSROUTE_") or not values:
        raise argparse.ArgumentTypeError(
            f"expected CAPSROUTE_NAME=value,value,... ('-' for unset), got {spec!r}")
    return [(name, None if v == "-" else v) for v in values.split(",")]


def label(setting: Setting) -> str:
    return " ".join(f"{k}={'-' if v is None else v}" for k, v in setting)


@contextlib.contextmanager
def applied(setting: Setting):
    """The environment with `setting` in it, restored afterwards."""
    before = {k: os.environ.get(k) for k, _ in setting}
    try:
        for k, v in setting:
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def results(u, W, gv, iterations: int) -> Tuple[torch.Tensor, ...]:
    """v of the forward, and dL/du, dL/dW of sum(v * gv), in float64."""
    u = u.detach().requires_grad_()
    W = W.detach().requires_grad_()
    v = capsroute.dynamic_routing(u, W, iterations)
    return tuple(t.detach().double() for t in (v, *torch.autograd.grad(v, (u, W), gv)))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def kernel_times(fn: Callable[[], None], calls: int) -> Dict[str, float]:
    """GPU microseconds per call of each kernel that fn runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(torch.device("cuda"))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(torch.device("cuda"))
    out: Dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_time_total > 0:
            name = e.key.replace("void ", "").replace("capsroute::cuda::", "")
            name = name[:name.index(">(") + 1] if ">(" in name else name  # no parameters
            out[name] = out.get(name, 0.0) + e.device_time_total / calls
    return out


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for cells in (header, ["-" * w for w in widths], *rows):
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(cells, widths))))


def run_shape(cfg: Config, settings: List[Setting], device: torch.device, args) -> None:
    print(f"\n== {cfg.label()} on {device_name(device)}")
    (u, W), gv = make_inputs(cfg, device, seed=cfg.B + cfg.N_in)

    # The same results under every setting (else its time means nothing). A setting that
    # fails (a launch the GPU refuses, say) is said and left out of this shape's timings, so
    # that it does not cost the others theirs on a GPU lent for minutes.
    first, runs = None, []
    for setting in settings:
        try:
            with applied(setting):
                got = results(u, W, gv, cfg.iterations)
        except (RuntimeError, ValueError) as error:
            print(f"skipped: {label(setting)}: {str(error).splitlines()[0]}")
            continue
        runs.append(setting)
        if first is None:
            first = got
            continue
        errs = ", ".join(f"{n} {rel_err(g, f):.1e}" for n, g, f in zip(("v", "grad_u", "grad_W"),
                                                                       got, first))
        print(f"check: {label(setting)} against {label(runs[0])}: relative error {errs}")
    del first
    settings = runs
    if not settings:
        return

    passes = {"fwd": lambda: forward_fn(capsroute.dynamic_routing, (u, W), cfg.iterations),
              "fwd+bwd": lambda: fwd_bwd_fn(capsroute.dynamic_routing, (u, W), gv, cfg.iterations)}
    samples: Dict[Tuple[int, str], List[float]] = {}
    for r in range(args.rounds):
        shift = r % len(settings)
        for s in settings[shift:] + settings[:shift]:
            k = settings.index(s)
            with applied(s):
                if device.type == "cpu":
                    for name, make in passes.items():
                        ms = time_cpu({name: make()}, args.repeats, args.warmup)[name]
                        samples.setdefault((k, name), []).append(ms * 1e3)
                    continue
                for name, make in passes.items():
                    us = time_cuda_graph(make(), args.repeats, args.warmup) * 1e3
                    samples.setdefault((k, f"{name} graph"), []).append(us)
                us = time_cuda(passes["fwd+bwd"](), args.repeats, args.warmup) * 1e3
                samples.setdefault((k, "fwd+bwd eager"), []).append(us)

    columns = [c for c in ("fwd graph", "fwd+bwd graph", "fwd+bwd eager", "fwd", "fwd+bwd")
               if (0, c) in samples]
    base = {c: statistics.median(samples[(0, c)]) for c in columns}
    rows = []
    for k, setting in enumerate(settings):
        cells = [label(setting)]
        for c in columns:
            xs = samples[(k, c)]
            m = statistics.median(xs)
            cells.append(f"{m:.1f} ({min(xs):.1f}-{max(xs):.1f})" +
                         ("" if k == 0 else f" {m / base[c]:.3f}x"))
        rows.append(cells)
    print(f"microseconds per call: median over {args.rounds} rounds (smallest-largest), "
          f"and against the first setting")
    table(["setting"] + columns, rows)

    if args.kernels and device.type == "cuda":
        per: List[Dict[str, float]] = []
        for setting in settings:
            with applied(setting):
                per.append(kernel_times(passes["fwd+bwd"](), args.kernel_calls))
        names = sorted(set().union(*per), key=lambda n: -max(p.get(n, 0.0) for p in per))
        print(f"\nGPU microseconds per forward+backward, by kernel ({args.kernel_calls} calls)")
        table(["kernel"] + [f"[{k}]" for k in range(len(settings))],
              [[n] + [f"{p[n]:.1f}" if n in p else "-" for p in per] for n in names] +
              [["total"] + [f"{sum(p.values()):.1f}" for p in per]])
        for k, setting in enumerate(settings):
            print(f"  [{k}] {label(setting)}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("switches", nargs="+", type=parse_switch,
                   help="CAPSROUTE_NAME=value,value,... ('-': unset); several give every "
                        "combination")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[128])
    p.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["float32"])
    p.add_argument("--in-caps", type=int, default=1152, help="N_in")
    p.add_argument("--out-caps", type=int, default=10, help="N_out")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20,
                   help="timed calls per measurement (CUDA without triton, and CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--kernels", action="store_true",
                   help="CUDA: also each kernel's GPU time per forward+backward and setting")
    p.add_argument("--kernel-calls", type=int, default=10)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    names = [values[0][0] for values in args.switches]
    if len(set(names)) != len(names):
        print("error: a switch is named twice", file=sys.stderr)
        return 2
    settings: List[Setting] = [tuple(s) for s in itertools.product(*args.switches)]
    for B, dtype in itertools.product(args.batch, args.dtype):
        cfg = Config(B=B, N_in=args.in_caps, N_out=args.out_caps, iterations=args.iterations,
                     dtype=dtype)
        run_shape(cfg, settings, device, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
