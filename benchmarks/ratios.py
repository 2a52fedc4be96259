"""Time the fused op against the reference, side by side in one process, and print one table.

For each configuration: the forward (under no_grad) and the forward+backward of
`capsroute.dynamic_routing`, of the eager reference `capsroute.reference.dynamic_routing`,
and of `torch.compile(reference.dynamic_routing)` (also mode="max-autotune" with
--max-autotune); with --op route, the same of `capsroute.route` and `reference.route` on
predictions u_hat made once beforehand (contiguous), their gradient taken for u_hat. The
table leads with the ratios (how many times faster the fused op is), then the absolute
times, then memory: the bytes the autograd graph saves for the backward
(measured with torch.autograd.graph.saved_tensors_hooks, distinct storages beyond the
inputs) and, on CUDA, the peak memory a forward+backward allocates beyond its inputs.
Last, each target of the issues that the rows bear on (issue 2's on the CPU, issue 3's on
CUDA: ratios, bf16 against float32, memory), met or not by this run's own figures.

    python benchmarks/ratios.py                       # the preset of the detected device
    python benchmarks/ratios.py --suite cpu           # B=32 float32, the canonical CPU row
    python benchmarks/ratios.py --suite gpu           # B=32/128/512 fp32, B=128 bf16, scale, route
    python benchmarks/ratios.py --op route --batch 64 # capsroute.route on given predictions
    python benchmarks/ratios.py --device cpu --batch 64 --dtype float64 --no-compile
    python benchmarks/ratios.py --json results.json   # also dump the rows
    python benchmarks/ratios.py --suite gpu --graph   # also each call replayed from a CUDA graph

Timing: fresh random inputs (never zeros), warm-up calls first, then the median of repeats.
On CPU with time.perf_counter, the implementations taking turns in rounds (each turn: one
untimed call, then three timed calls back to back), so that a noisy machine slows all of
them alike while each timed call finds the caches as the same implementation left them.
On CUDA with triton.testing.do_bench (median; L2 flushed before each call) when triton is
installed, else CUDA events: GPU time from the call's first enqueued work to its last, with
no synchronisation inside the timed call, so the host's launches overlap the GPU's work as
in a training loop and count only where the GPU waits for them. (The runs in
benchmarks/RESULTS.md up to the sixth device session ended each timed call with
torch.cuda.synchronize(), which put the host's wake-up and the next call's launch latency
into every figure: identical kernels measured 0.645 and 0.907 ms in two runs.) With
--graph, each call is also captured once in a CUDA graph and its replays timed the same way:
the GPU's work alone, with no host work, for the fused op and the eager reference.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import capsroute
from capsroute import reference

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
SHORT = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Config:
    B: int
    N_in: int = 1152
    D_in: int = 8
    N_out: int = 10
    D_out: int = 16
    iterations: int = 3
    dtype: str = "float32"
    op: str = "dynamic_routing"  # or "route": the routing of given predictions u_hat

    def label(self) -> str:
        shape = ("route " if self.op == "route" else "") + f"B={self.B}"
        if (self.N_in, self.D_in, self.N_out, self.D_out) != (1152, 8, 10, 16):
            shape += f" N_in={self.N_in} D_in={self.D_in} N_out={self.N_out} D_out={self.D_out}"
        if self.iterations != 3:
            shape += f" r={self.iterations}"
        return f"{shape} {SHORT[DTYPES[self.dtype]]}"


SUITES = {
    "cpu": [Config(B=32)],
    "gpu": [
        Config(B=32),
        Config(B=128),
        Config(B=512),
        Config(B=128, dtype="bfloat16"),
        Config(B=128, N_in=32768, N_out=64, D_in=8, D_out=16),
        Config(B=128, op="route"),  # last: issue 3 sets no target on route
    ],
}
OPS = {"dynamic_routing": (capsroute.dynamic_routing, reference.dynamic_routing),
       "route": (capsroute.route, reference.route)}


@dataclass
class Row:
    config: str
    device: str
    times_ms: Dict[str, Optional[float]] = field(default_factory=dict)  # "fwd/fused" -> ms
    saved_mib: Dict[str, Optional[float]] = field(default_factory=dict)
    peak_mib: Dict[str, Optional[float]] = field(default_factory=dict)
    rel_err: Optional[float] = None  # fused vs reference forward, a sanity check
    notes: List[str] = field(default_factory=list)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    msg = str(err)
    return "out of memory" in msg or "can't allocate memory" in msg or "CUDA error: out of memory" in msg


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_inputs(cfg: Config, device: torch.device, seed: int):
    """Fresh random inputs of a realistic scale (v neither saturated nor vanishing): the op's
    tensor arguments, (u, W) or for route (u_hat,), and an incoming gradient of v."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = DTYPES[cfg.dtype]
    u = torch.randn(cfg.B, cfg.N_in, cfg.D_in, generator=g)
    W = torch.randn(cfg.N_in, cfg.N_out, cfg.D_out, cfg.D_in, generator=g) / (cfg.D_in * cfg.N_in) ** 0.5
    gv = torch.randn(cfg.B, cfg.N_out, cfg.D_out, generator=g).to(device=device, dtype=dtype)
    u, W = u.to(device), W.to(device)
    if cfg.op == "route":  # made on the device: the scale shape's would not fit a CPU's memory
        return (torch.einsum("bik,ijdk->bijd", u, W).to(dtype).contiguous(),), gv
    return (u.to(dtype), W.to(dtype)), gv


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The timed calls. They do not synchronise: on CPU the work is done when they return, and
# on CUDA the timing brackets them with events.
def forward_fn(impl: Callable, inputs, iterations: int) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            impl(*inputs, iterations)

    return run


def fwd_bwd_fn(impl: Callable, inputs, gv, iterations: int) -> Callable[[], None]:
    leaves = tuple(t.detach().requires_grad_() for t in inputs)

    def run():
        v = impl(*leaves, iterations)
        torch.autograd.grad(v, leaves, gv)

    return run


def time_cpu(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int,
             per_round: int = 3) -> Dict[str, float]:
    """Median milliseconds of each fn over `repeats` timed calls. The implementations take
    turns in rounds (so that a machine that slows down or speeds up affects them alike);
    in its turn each one makes an untimed call, then `per_round` timed calls back to back,
    so that every timed call finds the caches and threads as the implementation's own
    previous call left them, not as the other implementations did."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    while any(len(v) < repeats for v in samples.values()):
        for name, fn in fns.items():
            fn()
            for _ in range(min(per_round, repeats - len(samples[name]))):
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def time_cuda(fn: Callable[[], None], repeats: int, warmup: int) -> float:
    """Median milliseconds of GPU time per call: from the first work the call enqueues to its
    last, including any time the GPU waits for the host to launch it."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except ImportError:
        pass
    for _ in range(warmup):
        fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(start, end):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))


def time_cuda_graph(fn: Callable[[], None], repeats: int, warmup: int) -> float:
    """time_cuda of replays of one call captured in a CUDA graph: the call's GPU work alone,
    without the host's launches (warmed up on a side stream first, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return time_cuda(graph.replay, repeats, warmup)
    finally:
        del graph  # its memory pool goes with it


def saved_bytes(impl: Callable, inputs, iterations: int) -> int:
    """Bytes of the distinct storages the autograd graph keeps for the backward, beyond
    the inputs (which the caller holds anyway)."""
    leaves = tuple(t.detach().requires_grad_() for t in inputs)
    held = {t.untyped_storage().data_ptr() for t in leaves}
    storages: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in held:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v = impl(*leaves, iterations)
    del v
    return sum(storages.values())


def peak_extra_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak CUDA memory of one call beyond what was allocated before it (the inputs)."""
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def run_config(cfg: Config, device: torch.device, args) -> Row:
    row = Row(config=cfg.label(), device=device.type)
    inputs, gv = make_inputs(cfg, device, seed=cfg.B + cfg.N_in)
    fused, ref = OPS[cfg.op]
    impls: Dict[str, Callable] = {"fused": fused, "eager": ref}
    if not args.no_compile:
        torch._dynamo.reset()  # a fresh cache per configuration: no stale or limited recompiles
        impls["compile"] = torch.compile(ref)
        if args.max_autotune:
            impls["compile-ma"] = torch.compile(ref, mode="max-autotune")

    # Sanity: the fused op must agree with the reference before its speed means anything.
    # The reference runs in float32 (float64 for float64) on the same rounded inputs, so
    # that only the fused op's rounding is measured.
    try:
        with torch.no_grad():
            acc = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
            v = fused(*inputs, cfg.iterations).to(acc)
            v_ref = ref(*(t.to(acc) for t in inputs), cfg.iterations)
            row.rel_err = ((v - v_ref).norm() / v_ref.norm()).item()
            del v, v_ref
    except Exception as err:  # the reference may not fit in memory
        if not is_oom(err):
            raise
        row.notes.append("reference OOM in the sanity check")
    free_memory(device)

    for pass_name in ("fwd", "fwd+bwd"):
        fns = {}
        for name, impl in impls.items():
            if pass_name == "fwd":
                fns[name] = forward_fn(impl, inputs, cfg.iterations)
            else:
                fns[name] = fwd_bwd_fn(impl, inputs, gv, cfg.iterations)
        # Drop implementations that cannot run at this size (OOM), and warm the rest up
        # (this is also where torch.compile compiles).
        runnable = {}
        for name, fn in fns.items():
            try:
                fn()
                runnable[name] = fn
            except Exception as err:
                if not is_oom(err):
                    raise
                row.times_ms[f"{pass_name}/{name}"] = None
                row.notes.append(f"{name} {pass_name}: OOM")
            free_memory(device)
        if device.type == "cpu":
            row.times_ms.update(
                {f"{pass_name}/{k}": v for k, v in time_cpu(runnable, args.repeats, args.warmup).items()}
            )
        else:
            for name, fn in runnable.items():
                try:
                    row.times_ms[f"{pass_name}/{name}"] = time_cuda(fn, args.repeats, args.warmup)
                except Exception as err:
                    if not is_oom(err):
                        raise
                    row.times_ms[f"{pass_name}/{name}"] = None
                    row.notes.append(f"{name} {pass_name}: OOM while timed")
                free_memory(device)
            # (torch.compile's calls are not captured: its own CUDA-graph mode is
            # mode="reduce-overhead", and a failed capture can leave the stream unusable.)
            graphed = {k: v for k, v in runnable.items() if k in ("fused", "eager")}
            for name, fn in (graphed.items() if args.graph else ()):
                key = f"{pass_name} graph/{name}"
                try:
                    row.times_ms[key] = time_cuda_graph(fn, args.repeats, args.warmup)
                except Exception as err:  # OOM, or an implementation that cannot be captured
                    row.times_ms[key] = None
                    row.notes.append(f"{name} {pass_name}: no CUDA graph ({type(err).__name__}: "
                                     f"{str(err).splitlines()[0][:120] if str(err) else ''})")
                free_memory(device)

    for name, impl in impls.items():
        try:
            row.saved_mib[name] = saved_bytes(impl, inputs, cfg.iterations) / 2**20
        except Exception as err:
            if not is_oom(err):
                raise
            row.saved_mib[name] = None
        free_memory(device)
        if device.type == "cuda":
            try:
                fn = fwd_bwd_fn(impl, inputs, gv, cfg.iterations)
                row.peak_mib[name] = peak_extra_bytes(fn, device) / 2**20
            except Exception as err:
                if not is_oom(err):
                    raise
                row.peak_mib[name] = None
            free_memory(device)
    return row


def fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def fmt_ratio(num: Optional[float], den: Optional[float]) -> str:
    if num is None or den is None:
        return "-"
    return f"{num / den:.1f}x"


def fmt_mib(x: Optional[float]) -> str:
    if x is None:
        return "OOM"
    return f"{x:.2f}" if x < 10 else f"{x:.0f}"


def print_table(rows: List[Row], baselines: List[str]) -> None:
    header = ["config", "pass"] + [f"vs {b}" for b in baselines] + ["fused ms"] + [f"{b} ms" for b in baselines]
    lines = []
    for row in rows:
        passes = [p for p in ("fwd", "fwd+bwd", "fwd graph", "fwd+bwd graph")
                  if any(k.startswith(p + "/") for k in row.times_ms)]
        for pass_name in passes:
            fused = row.times_ms.get(f"{pass_name}/fused")
            cells = [row.config if pass_name == passes[0] else "", pass_name]
            cells += [fmt_ratio(row.times_ms.get(f"{pass_name}/{b}"), fused) for b in baselines]
            cells += [fmt_ms(fused)] + [fmt_ms(row.times_ms.get(f"{pass_name}/{b}")) for b in baselines]
            lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]

    def show(cells):
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(show(header))
    print("  ".join("-" * w for w in widths))
    for cells in lines:
        print(show(cells))

    # Memory, per configuration.
    names = ["fused"] + baselines
    mem_header = ["config"] + [f"saved MiB {n}" for n in names]
    has_peak = any(row.peak_mib for row in rows)
    if has_peak:
        mem_header += [f"peak MiB {n}" for n in names]
    mem_lines = []
    for row in rows:
        cells = [row.config] + [fmt_mib(row.saved_mib.get(n)) for n in names]
        if has_peak:
            cells += [fmt_mib(row.peak_mib.get(n)) for n in names]
        mem_lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(mem_header, *mem_lines)]
    print()
    print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(mem_header, widths))))
    print("  ".join("-" * w for w in widths))
    for cells in mem_lines:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    for row in rows:
        if row.rel_err is not None:
            print(f"check: {row.config}: fused forward vs reference, relative error {row.rel_err:.1e}")
        for note in row.notes:
            print(f"note: {row.config}: {note}")


# The issues' targets, each a (row, pass, baseline, least ratio) that the table above holds:
# issue 2 on the CPU suite, issue 3 on the GPU suite (H100). Only the targets of the rows this
# run made are checked; a time that the run could not take (an OOM) leaves one "not measured".
SCALE = Config(B=128, N_in=32768, N_out=64, D_in=8, D_out=16).label()
RATIO_TARGETS = {
    "cpu": [("B=32 fp32", "fwd", "eager", 10), ("B=32 fp32", "fwd", "compile", 2),
            ("B=32 fp32", "fwd+bwd", "eager", 5), ("B=32 fp32", "fwd+bwd", "compile", 1.5)],
    "cuda": [("B=128 fp32", "fwd", "eager", 25), ("B=128 fp32", "fwd", "compile", 10),
             ("B=128 fp32", "fwd+bwd", "eager", 15), ("B=128 fp32", "fwd+bwd", "compile", 8),
             ("B=128 fp32", "fwd", "compile-ma", 7), ("B=128 fp32", "fwd+bwd", "compile-ma", 4),
             ("B=32 fp32", "fwd", "compile", 10), ("B=512 fp32", "fwd", "compile", 10),
             (SCALE, "fwd+bwd", "compile", 5)],
}


def target_checks(rows: List[Row], device: str,
                  baselines: List[str]) -> List[Tuple[str, str, Optional[bool]]]:
    """The targets of `device`'s issue that this run's rows and `baselines` bear on, each as
    (what, measured, met); met is None where a time or a peak is missing (an OOM)."""
    by_config = {r.config: r for r in rows}
    checks: List[Tuple[str, str, Optional[bool]]] = []

    def check(what: str, values: Tuple[Optional[float], ...], show: Callable[..., str],
              meets: Callable[..., bool]) -> None:
        if any(x is None for x in values):
            checks.append((what, "-", None))
        else:
            checks.append((what, show(*values), meets(*values)))

    for config, pass_name, baseline, least in RATIO_TARGETS[device]:
        row = by_config.get(config)
        if row is None or baseline not in baselines:
            continue
        check(f"{config} {pass_name}: >= {least:g}x {baseline}",
              (row.times_ms.get(f"{pass_name}/fused"), row.times_ms.get(f"{pass_name}/{baseline}")),
              lambda fused, base: f"{base / fused:.1f}x",
              lambda fused, base: base / fused >= least)
    if device != "cuda":
        return checks
    single, half = by_config.get("B=128 fp32"), by_config.get("B=128 bf16")
    if single is not None and half is not None:
        for pass_name in ("fwd", "fwd+bwd"):
            key = f"{pass_name}/fused"
            check(f"B=128 bf16 {pass_name}: fused no slower than fp32",
                  (half.times_ms.get(key), single.times_ms.get(key)),
                  lambda a, b: f"{a:.3f} vs {b:.3f} ms", lambda a, b: a <= b)
    if single is not None:
        check("B=128 fp32 fwd+bwd: peak extra memory <= 1/10 of eager's",
              (single.peak_mib.get("fused"), single.peak_mib.get("eager")),
              lambda fused, eager: f"{fused:.0f} vs {eager:.0f} MiB",
              lambda fused, eager: fused <= eager / 10)
    scale = by_config.get(SCALE)
    if scale is not None:
        check(f"{SCALE} fwd+bwd: peak extra memory <= 3 GB", (scale.peak_mib.get("fused"),),
              lambda fused: f"{fused:.0f} MiB", lambda fused: fused * 2**20 <= 3e9)
    return checks


def print_targets(rows: List[Row], device: str, baselines: List[str]) -> None:
    checks = target_checks(rows, device, baselines)
    if not checks:
        return
    # The run's own card is named in the header line; the issues set the targets on these.
    issue = "issue 3, set for an H100" if device == "cuda" else "issue 2, set for the 2-core CPU"
    print(f"\ntargets ({issue}; each against this run's own baselines):")
    for what, measured, met in checks:
        status = "not measured" if met is None else "met" if met else "NOT met"
        print(f"  {status:<12}  {what}: {measured}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--suite", choices=sorted(SUITES), default=None,
                   help="a preset of configurations (default: the preset of the device, "
                        "unless shape options are given)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--in-caps", type=int, default=1152, help="N_in")
    p.add_argument("--in-dim", type=int, default=8, help="D_in")
    p.add_argument("--out-caps", type=int, default=10, help="N_out")
    p.add_argument("--out-dim", type=int, default=16, help="D_out")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--op", choices=sorted(OPS), default="dynamic_routing",
                   help="route: capsroute.route on predictions made beforehand")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--max-autotune", action="store_true",
                   help='also time torch.compile(reference, mode="max-autotune")')
    p.add_argument("--graph", action="store_true",
                   help="CUDA: also time the fused op's and the eager reference's calls "
                        "replayed from a CUDA graph (no host work)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats (default: 15 on CPU, 50 on CUDA without triton)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if args.graph and device.type != "cuda":
        print("error: --graph times CUDA graphs: it needs --device cuda", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 15 if device.type == "cpu" else 50

    custom_shape = args.batch is not None or (
        (args.in_caps, args.in_dim, args.out_caps, args.out_dim, args.iterations, args.dtype,
         args.op) != (1152, 8, 10, 16, 3, "float32", "dynamic_routing"))
    if args.suite is not None:
        configs = SUITES[args.suite]
    elif custom_shape:
        configs = [Config(B=args.batch or (32 if device.type == "cpu" else 128), N_in=args.in_caps,
                          D_in=args.in_dim, N_out=args.out_caps, D_out=args.out_dim,
                          iterations=args.iterations, dtype=args.dtype, op=args.op)]
    else:
        configs = SUITES["cpu" if device.type == "cpu" else "gpu"]

    baselines = ["eager"] + ([] if args.no_compile else ["compile"] + (["compile-ma"] if args.max_autotune else []))
    print(f"capsroute {capsroute.__version__} | torch {torch.__version__} | {device_name(device)}")
    print(f"ratios = baseline time / fused time (higher: fused faster); times are medians of "
          f"{args.repeats if device.type == 'cpu' else 'do_bench/event'} repeats; '-': out of "
          f"memory or not captured (see the notes)")
    rows = []
    for cfg in configs:
        t0 = time.perf_counter()
        rows.append(run_config(cfg, device, args))
        # Each configuration's times as it finishes: what a run stopped by a time limit leaves.
        times = ", ".join(f"{k} {fmt_ms(v)}" for k, v in rows[-1].times_ms.items())
        print(f"  ({cfg.label()}: {time.perf_counter() - t0:.0f} s; ms: {times})", file=sys.stderr)
    print()
    print_table(rows, baselines)
    print_targets(rows, device.type, baselines)
    # Relative-norm tolerances of the forward (half types: a few roundings of the output).
    tolerance = {"float64": 1e-10, "float32": 1e-5, "float16": 3e-3, "bfloat16": 1e-2}
    bad = [(r, c) for r, c in zip(rows, configs)
           if r.rel_err is not None and not r.rel_err <= tolerance[c.dtype]]
    for r, _ in bad:
        print(f"WARNING: {r.config}: fused forward differs from the reference by "
              f"{r.rel_err:.3g} (relative norm)")
    if args.json:
        meta = {
            "capsroute": capsroute.__version__,
            "torch": torch.__version__,
            "device": device_name(device),
            "host": platform.node(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "repeats": args.repeats,
        }
        with open(args.json, "w") as f:
            targets = [{"target": what, "measured": measured, "met": met}
                       for what, measured, met in target_checks(rows, device.type, baselines)]
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows], "targets": targets}, f,
                      indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
