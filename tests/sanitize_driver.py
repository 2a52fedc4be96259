"""A small driver for compute-sanitizer (tests/sanitize_cuda.sh): every capsroute op, forward
and backward, on CUDA, with every option and dtype, on a few small shapes (odd sizes, one
past the block sizes, an empty batch, strided inputs). Results are compared with the CPU
kernels, so a kernel that reads garbage fails here too.

Exit status: 0 all good; 1 a result differs from the CPU's; 2 nothing to check (no GPU, or
a build without CUDA kernels). Not a pytest module (its name does not start with test_).
"""
from __future__ import annotations

import itertools
import sys

import torch

import capsroute
from capsroute import _ops

# (B, N_in, N_out, D_in, D_out)
SHAPES = [(3, 7, 5, 3, 11), (1, 1, 1, 1, 1), (2, 37, 3, 2, 5), (2, 1152, 10, 8, 16),
          (0, 7, 5, 3, 11)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if b.numel() == 0:
        return 0.0
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def run(op, shape, dtype, iterations, bias, leaky, detach, coupling, strided, gen):
    B, N_in, N_out, D_in, D_out = shape
    if op == "dynamic_routing":
        u = torch.randn(B, N_in, D_in, generator=gen)
        scale = N_out / (D_out * N_in * D_in) ** 0.5
        w = torch.randn(N_in, N_out, D_out, D_in, generator=gen) * scale
        xs = [u, w]
    else:
        xs = [torch.randn(B, N_in, N_out, D_out, generator=gen) * N_out / (D_out * N_in) ** 0.5]
    b = torch.randn(N_out, D_out, generator=gen) * 0.5 if bias else None
    g_v = torch.randn(B, N_out, D_out, generator=gen)
    g_c = torch.randn(B, N_in, N_out, generator=gen)
    results = {}
    for device in ("cpu", "cuda"):
        args = [x.to(device, dtype) for x in xs]
        if strided:  # the same values, laid out transposed
            args = [a.transpose(-1, -2).contiguous().transpose(-1, -2) for a in args]
        args = [a.requires_grad_() for a in args]
        bb = b.to(device, dtype).requires_grad_() if bias else None
        v, c = getattr(capsroute, op)(*args, iterations, bias=bb, leaky=leaky, detach=detach,
                                      return_coupling=True)
        outs, gs = [v], [g_v.to(device, dtype)]
        if coupling and c.requires_grad:
            outs.append(c)
            gs.append(g_c.to(device, dtype))
        leaves = args + ([bb] if bias else [])
        grads = torch.autograd.grad(outs, leaves, gs)
        results[device] = [v, c, *grads]
    torch.cuda.synchronize()
    bad = []
    for k, (x, y) in enumerate(zip(results["cuda"], results["cpu"])):
        err = rel_err(x, y)
        if not (err <= TOL[dtype]) or not torch.isfinite(x).all():
            bad.append(f"output {k}: relative error {err:.2e}")
    return bad


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_driver: no CUDA device", file=sys.stderr)
        return 2
    if not _ops.has_cuda_kernels():
        print("sanitize_driver: this capsroute build has no CUDA kernels", file=sys.stderr)
        return 2
    if "--check-only" in sys.argv:
        return 0
    gen = torch.Generator().manual_seed(0)
    failures, runs = [], 0
    every = list(itertools.product([1, 3], [False, True], [False, True], [False, True],
                                   [False, True]))
    # (iterations, bias, leaky, detach, coupling): a few for the other dtypes and the big shape
    some = [(3, False, False, False, False), (3, True, True, False, True),
            (3, True, False, True, True), (1, False, True, True, False)]
    for op, shape in itertools.product(["dynamic_routing", "route"], SHAPES):
        big = shape[1] > 100
        for dtype in [torch.float32] if big else DTYPES:
            flags = every if (dtype == torch.float32 and not big) else some
            for iterations, bias, leaky, detach, coupling in flags:
                strided = bias and not leaky  # some runs with strided inputs
                bad = run(op, shape, dtype, iterations, bias, leaky, detach, coupling, strided,
                          gen)
                runs += 1
                if bad:
                    failures.append(f"{op} {shape} {dtype} iterations={iterations} "
                                    f"bias={bias} leaky={leaky} detach={detach} "
                                    f"coupling={coupling}: " + "; ".join(bad))
    for f in failures:
        print("MISMATCH", f)
    print(f"sanitize_driver: {runs} runs, {len(failures)} mismatches against the CPU kernels")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
