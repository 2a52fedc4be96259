"""Quick CUDA check used during kernel development on a lent GPU: float64 agreement with
the reference for every option (values and gradients), float32 error at the canonical shape,
run-to-run determinism, and a first timing against eager and torch.compile.

    python scripts/cuda_check.py [--quick]
"""
import argparse
import itertools
import os
import sys
import time

import torch

import capsroute
from capsroute import reference as ref

p = argparse.ArgumentParser()
p.add_argument("--quick", action="store_true")
p.add_argument("--no-time", action="store_true")
p.add_argument("--tiny", action="store_true", help="one small shape, forward+backward only (for compute-sanitizer)")
args = p.parse_args()
dev = "cuda"
torch.manual_seed(0)


def rel(a, b):
    if a is None or b is None:  # an input that gets no gradient on one side
        other = b if a is None else a
        return 0.0 if other is None else float(other.abs().max() > 0)
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def run(fn, u, W, bias, r, leaky, detach, route):
    kw = dict(bias=bias, leaky=leaky, detach=detach, return_coupling=True)
    if route:
        # the same leaf for both sides, so that the gradients compare
        uh = run.u_hat = run.u_hat if fn == "ref" else ref.predictions(u, W).detach().requires_grad_()
        v, c = (capsroute.route if fn == "fused" else ref.route)(uh, r, **kw)
        ins = [uh]
    else:
        v, c = (capsroute.dynamic_routing if fn == "fused" else ref.dynamic_routing)(u, W, r, **kw)
        ins = [u, W]
    if bias is not None:
        ins.append(bias)
    return v, c, ins


worst = 0.0
shapes = [(3, 7, 5, 3, 11), (2, 37, 10, 8, 16), (5, 9, 20, 4, 16), (4, 6, 3, 5, 24), (2, 5, 64, 8, 16),
          (9, 13, 1, 1, 1)]
if args.quick:
    shapes = shapes[:3]  # one group of output capsules, and two
if args.tiny:
    shapes = [(9, 13, 3, 8, 16), (4, 5, 20, 3, 24)]
fails = []
for (B, Ni, No, Di, Do) in shapes:
    options = itertools.product([False, True], [False, True], [False, True], [1, 2, 3], [False, True])
    if args.tiny:
        options = [(True, False, True, 3, False), (False, True, False, 2, True), (False, False, True, 3, True)]
    for leaky, detach, use_bias, r, route in options:
        g = torch.Generator(device="cpu").manual_seed(B * 1000 + Ni)
        u = torch.randn(B, Ni, Di, dtype=torch.float64, generator=g).to(dev).requires_grad_()
        W = (torch.randn(Ni, No, Do, Di, dtype=torch.float64, generator=g) * 0.5).to(dev).requires_grad_()
        bias = (torch.randn(No, Do, dtype=torch.float64, generator=g)).to(dev).requires_grad_() if use_bias else None
        v, c, ins = run("fused", u, W, bias, r, leaky, detach, route)
        v2, c2, ins2 = run("ref", u, W, bias, r, leaky, detach, route)
        gv = torch.randn_like(v)
        gc = torch.randn_like(c)
        l1 = (v * gv).sum() + (c * gc).sum()
        l2 = (v2 * gv).sum() + (c2 * gc).sum()
        gr1 = torch.autograd.grad(l1, ins, allow_unused=True)
        gr2 = torch.autograd.grad(l2, ins, allow_unused=True)
        errs = [rel(v, v2), rel(c, c2)] + [rel(a, b) for a, b in zip(gr1, gr2)]
        e = max(errs)
        worst = max(worst, e)
        if not e < 1e-9:
            fails.append(((B, Ni, No, Di, Do), leaky, detach, use_bias, r, route, ["%.1e" % x for x in errs]))
print(f"float64 vs reference: worst relative error {worst:.2e}; {len(fails)} failing cases")
for f in fails[:15]:
    print("  FAIL", f)
if args.tiny:
    # float64 runs neither the row passes (forward and gradient), nor the kept last pass with
    # one input capsule per warp (weight_grad_capsules_kernel), nor the recomputing one with
    # operands: float32 and bfloat16 on a shape that takes them, small for the sanitizers (13
    # input capsules: CAPSROUTE_CAPSULE_GRAD asks for 4 warps a block in the kept pass, where
    # by default it needs more capsules per multiprocessor), then float32 with the couplings
    # recomputed (CAPSROUTE_COUPLING_CACHE_MB=0), the rows read twice from global memory
    # (CAPSROUTE_PARK_ROWS=0) and parked in shared memory (the default where they fit).
    os.environ["CAPSROUTE_CAPSULE_GRAD"] = "4"
    B, Ni, No, Di, Do = 20, 13, 10, 8, 16
    g = torch.Generator(device="cpu").manual_seed(7)

    def weights(Ni):
        return (torch.randn(B, Ni, Di, dtype=torch.float64, generator=g),
                torch.randn(Ni, No, Do, Di, dtype=torch.float64, generator=g) * 4 / (Ni * Di) ** 0.5)

    def routed(u64, W64, dtype, **switches):
        """[v, grad u, grad W] in dtype (float64: the reference) under the switches given."""
        os.environ.update(switches)
        u, W = (x.to(dev, dtype).requires_grad_() for x in (u64, W64))
        fn = ref.dynamic_routing if dtype == torch.float64 else capsroute.dynamic_routing
        v = fn(u, W, 3, leaky=True)
        return [v, *torch.autograd.grad(v, [u, W], gv64.to(dev, dtype))]

    failed = []

    def report(what, got, want, tol):
        errs = [rel(a, b) for a, b in zip(got, want)]
        if not max(errs) < tol:
            failed.append(what)
        print(f"{what} {(B, Ni, No, Di, Do)} v, grad u, grad W: "
              + ", ".join("%.1e" % e for e in errs) + ("" if max(errs) < tol else "  FAIL"))

    u64, W64 = weights(Ni)
    gv64 = torch.randn(B, No, Do, dtype=torch.float64, generator=g)
    want = routed(u64, W64, torch.float64)
    for dtype, cache, park, tol in [(torch.float32, "", "", 1e-4), (torch.bfloat16, "", "", 5e-2),
                                    (torch.float32, "0", "0", 1e-4), (torch.float32, "0", "", 1e-4)]:
        got = routed(u64, W64, dtype, CAPSROUTE_COUPLING_CACHE_MB=cache, CAPSROUTE_PARK_ROWS=park)
        what = f"{dtype}{' recomputed' if cache else ''}{', rows read twice' if park else ''}"
        report(what, got, want, tol)
    # The row passes with the lanes reading W[i] themselves (CAPSROUTE_ROW_DIRECT=1), over 3
    # input capsules a block (two blocks per multiprocessor planned), where the pairs' softmax
    # statistics alternate between two sets: float32 against float64.
    Ni = 6 * torch.cuda.get_device_properties(0).multi_processor_count + 1
    u64, W64 = weights(Ni)
    want = routed(u64, W64, torch.float64, CAPSROUTE_COUPLING_CACHE_MB="")
    got = routed(u64, W64, torch.float32, CAPSROUTE_ROW_DIRECT="1")
    report("float32 direct rows", got, want, 1e-4)
    # The same in thread-block clusters (CAPSROUTE_ROW_CLUSTER), whose blocks read each other's
    # sums from shared memory: direct rows in clusters of 4, staged ones in clusters of 8.
    for direct, cluster in [("1", "4"), ("", "8")]:
        got = routed(u64, W64, torch.float32, CAPSROUTE_ROW_DIRECT=direct,
                     CAPSROUTE_ROW_CLUSTER=cluster)
        report(f"float32 {'direct' if direct else 'staged'} rows, clusters of {cluster}", got,
               want, 1e-4)
    # The first iteration as one matrix product (first_sums_kernel, the default where D_in is a
    # multiple of 8) over 5 input capsules a block (two staged chunks, of 32 and 8 dims: both
    # buffers), and the pass it replaces (CAPSROUTE_FIRST_SUMS=0; every float32 run above,
    # whose blocks have at most 4 capsules, has the product).
    Ni = 9 * torch.cuda.get_device_properties(0).multi_processor_count + 1
    u64, W64 = weights(Ni)
    want = routed(u64, W64, torch.float64, CAPSROUTE_ROW_DIRECT="", CAPSROUTE_ROW_CLUSTER="")
    for first in ("", "0"):
        got = routed(u64, W64, torch.float32, CAPSROUTE_FIRST_SUMS=first)
        report(f"float32 first iteration {'by the pass' if first else 'as one product'}", got,
               want, 1e-4)
    sys.exit(3 if failed else 0)  # (the sanitizers' own errors exit 9: gpu_session.sh)

# dtypes at the canonical shape
B, Ni, No, Di, Do = 128, 1152, 10, 8, 16
u = torch.randn(B, Ni, Di, device=dev)
W = torch.randn(Ni, No, Do, Di, device=dev) / Di ** 0.5
v64 = ref.dynamic_routing(u.double(), W.double())
for dt in [torch.float32, torch.bfloat16, torch.float16]:
    ud, Wd = u.to(dt), W.to(dt)
    v = capsroute.dynamic_routing(ud, Wd)
    vr = ref.dynamic_routing(ud.double(), Wd.double())
    print(f"{dt}: rel err vs float64 reference of the same inputs {rel(v, vr):.2e}")
# gradients float32 canonical
uu = u.clone().requires_grad_(); WW = W.clone().requires_grad_()
v = capsroute.dynamic_routing(uu, WW); gv = torch.randn_like(v)
g1 = torch.autograd.grad((v * gv).sum(), [uu, WW])
u64 = u.double().requires_grad_(); W64 = W.double().requires_grad_()
v2 = ref.dynamic_routing(u64, W64)
g2 = torch.autograd.grad((v2 * gv.double()).sum(), [u64, W64])
print(f"float32 canonical: v {rel(v, v2):.2e}, grad_u {rel(g1[0], g2[0]):.2e}, grad_W {rel(g1[1], g2[1]):.2e}")
# determinism
outs = []
for _ in range(3):
    uu.grad = None; WW.grad = None
    v = capsroute.dynamic_routing(uu, WW)
    (v * gv).sum().backward()
    outs.append((v.clone(), uu.grad.clone(), WW.grad.clone()))
same = all(torch.equal(a, b) for o in outs[1:] for a, b in zip(o, outs[0]))
print("bit-identical across runs:", same)
sys.stdout.flush()

if args.no_time:
    sys.exit(0)
from triton.testing import do_bench

def fwd(f):
    return lambda: f(u, W)

def fb(f):
    def g():
        v = f(uu, WW)
        torch.autograd.grad(v.sum(), [uu, WW])
    return g

comp = torch.compile(ref.dynamic_routing)
rows = []
for name, f in [("fused", capsroute.dynamic_routing), ("eager", ref.dynamic_routing), ("compile", comp)]:
    tf = do_bench(fwd(f), warmup=50, rep=300, return_mode="median")
    tb = do_bench(fb(f), warmup=50, rep=300, return_mode="median")
    rows.append((name, tf, tb))
print(f"{'B=128 canonical':16s} {'fwd us':>10s} {'fwd+bwd us':>12s}")
for name, tf, tb in rows:
    print(f"{name:16s} {tf*1e3:10.1f} {tb*1e3:12.1f}")
print(f"ratios: fwd eager/fused {rows[1][1]/rows[0][1]:.1f}x compile/fused {rows[2][1]/rows[0][1]:.1f}x; "
      f"fwd+bwd eager/fused {rows[1][2]/rows[0][2]:.1f}x compile/fused {rows[2][2]/rows[0][2]:.1f}x")
