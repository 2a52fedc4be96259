"""How much of a call's host time is Python autograd: capsroute.dynamic_routing against the same
two ops wrapped in a C++ torch::autograd::Function, built here on the fly (load_inline, ~40 s
on 2 cores). A measurement for a design decision (DESIGN.md registers autograd from Python),
not a second implementation: the prototype covers only the plain-training path (no bias, no
double backward, no forward-mode AD), and its gradients are checked bit for bit against the
functions' before anything is timed.

    python scripts/host_autograd_cxx.py [--device cuda] [--batch 32 128] [--calls 200]
                                        [--in-caps 1152] [--out-caps 10]

Prints the host's time per call of back-to-back calls (no synchronisation between them; on a
GPU the enqueueing time, which bounds an eager call when it exceeds the GPU time). On a CPU,
a tiny layer (`--batch 2 --in-caps 4 --out-caps 3`) leaves mostly the host's own work.
"""
import argparse
import tempfile
import time

import torch
from torch.utils.cpp_extension import load_inline

import capsroute

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

static const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("capsroute::dynamic_routing", "")
          .typed<Outputs(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                         int64_t, bool, bool, double, bool)>();
  return op;
}

static const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("capsroute::dynamic_routing_backward", "")
          .typed<Outputs(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, bool, int64_t, bool, bool,
                         double)>();
  return op;
}

struct Routing : public torch::autograd::Function<Routing> {
  static variable_list forward(AutogradContext* ctx, at::Tensor u, at::Tensor weight,
                               int64_t iterations) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [v, c, s] = forward_op().call(u, weight, c10::nullopt, iterations, false, false, 1e-8,
                                       false);
    ctx->save_for_backward({u, weight, s});
    ctx->saved_data["iterations"] = iterations;
    ctx->mark_non_differentiable({c, s});
    return {v, c, s};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_u, grad_weight, grad_bias] = backward_op().call(
        grads[0], c10::nullopt, saved[0], saved[1], saved[2], false,
        ctx->saved_data["iterations"].toInt(), false, false, 1e-8);
    return {grad_u, grad_weight, at::Tensor()};
  }
};

at::Tensor routing(at::Tensor u, at::Tensor weight, int64_t iterations) {
  return Routing::apply(u, weight, iterations)[0];
}
"""


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--in-caps", type=int, default=1152)
    p.add_argument("--out-caps", type=int, default=10)
    args = p.parse_args(argv)
    device = torch.device(args.device)

    # The build is removed afterwards (the loaded library stays usable until exit).
    with tempfile.TemporaryDirectory(prefix="capsroute_host_cxx_") as build:
        ext = load_inline("capsroute_host_cxx", cpp_sources=[SOURCE], functions=["routing"],
                          build_directory=build, extra_cflags=["-O2"], verbose=False)
    for batch in args.batch:
        compare(ext, device, batch, args.in_caps, args.out_caps, args.calls)


def compare(ext, device, batch, n_in, n_out, calls_per_run):
    """The two forms' gradients (bit for bit), then their host times, for `batch` examples of
    n_in input capsules of 8 dims routed to n_out of 16 (the MNIST layer: 1152 and 10)."""
    gen = torch.Generator(device=device).manual_seed(0)
    u = torch.randn(batch, n_in, 8, device=device, generator=gen).requires_grad_()
    W = (torch.randn(n_in, n_out, 16, 8, device=device, generator=gen)
         * (8 * n_in) ** -0.5 * 4).requires_grad_()
    gv = torch.randn(batch, n_out, 16, device=device, generator=gen)

    calls = {
        "capsroute.dynamic_routing (Python autograd kernel)":
            lambda: capsroute.dynamic_routing(u, W, 3),
        "the same ops, C++ autograd function": lambda: ext.routing(u, W, 3),
    }
    want = torch.autograd.grad(calls[next(iter(calls))](), (u, W), gv)
    for name, call in calls.items():
        got = torch.autograd.grad(call(), (u, W), gv)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), f"{name}: other gradients"

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def per_call(fn):
        """Median over 5 runs (after one to warm up) of the host's time per call."""
        runs = []
        for _ in range(6):
            sync()
            t0 = time.perf_counter()
            for _ in range(calls_per_run):
                fn()
            runs.append((time.perf_counter() - t0) / calls_per_run * 1e6)
        sync()
        return sorted(runs[1:])[2]

    print(f"== host time per call, back to back, B={batch} N_in={n_in} N_out={n_out} float32 "
          f"on {device} (torch {torch.__version__})")
    for name, call in calls.items():
        fwd = per_call(call)
        fwd_bwd = per_call(lambda: torch.autograd.grad(call(), (u, W), gv))
        print(f"  forward with its graph {fwd:8.1f} us, forward+backward {fwd_bwd:8.1f} us  "
              f"{name}")


if __name__ == "__main__":
    main()
