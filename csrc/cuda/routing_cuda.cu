// The CUDA implementations of the capsroute ops: validation, device guard, allocation,
// then the launch sequence of the input's dtype (csrc/cuda/routing_launch.cuh,
// instantiated per dtype in csrc/cuda/instantiate_*.cu).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "../op_utils.h"
#include "../schemas.h"
#include "routing_launch.h"
#include "runtime.h"

namespace capsroute {

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_routing_cuda(
    const at::Tensor& u_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
    int64_t iterations, bool leaky, bool detach, double eps, bool return_coupling) {
  const RoutingSizes n = check_dynamic_routing(u_in, weight_in, bias_in, iterations, eps);
  (void)detach;  // the forward values do not depend on it
  const cuda::DeviceGuard guard(u_in.device());
  cuda::check_device("capsroute.dynamic_routing", cuda::device_info());
  const auto u = u_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto bias = contiguous(bias_in);
  auto [v, c, s] = forward_outputs(u, n, iterations, return_coupling);
  if (n.B == 0) return {v, c, s};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "dynamic_routing_cuda", [&] {
    cuda_launch::dynamic_routing_forward<scalar_t>(u, weight, bias, n, iterations, leaky, eps, v, c, s);
  });
  return {v, c, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cuda(const at::Tensor& u_hat_in,
                                                          const c10::optional<at::Tensor>& bias_in,
                                                          int64_t iterations, bool leaky,
                                                          bool detach, double eps,
                                                          bool return_coupling) {
  const RoutingSizes n = check_route(u_hat_in, bias_in, iterations, eps);
  (void)detach;
  const cuda::DeviceGuard guard(u_hat_in.device());
  cuda::check_device("capsroute.route", cuda::device_info());
  const auto u_hat = u_hat_in.contiguous();
  const auto bias = contiguous(bias_in);
  auto [v, c, s] = forward_outputs(u_hat, n, iterations, return_coupling);
  if (n.B == 0) return {v, c, s};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_hat.scalar_type(), "route_cuda", [&] {
    cuda_launch::route_forward<scalar_t>(u_hat, bias, n, iterations, leaky, eps, v, c, s);
  });
  return {v, c, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_routing_backward_cuda(
    const at::Tensor& grad_v, const c10::optional<at::Tensor>& grad_c, const at::Tensor& u_in,
    const at::Tensor& weight_in, const at::Tensor& s_in, bool has_bias, int64_t iterations,
    bool leaky, bool detach, double eps) {
  const RoutingSizes n = check_dynamic_routing(u_in, weight_in, c10::nullopt, iterations, eps);
  const cuda::DeviceGuard guard(u_in.device());
  cuda::check_device("capsroute.dynamic_routing_backward", cuda::device_info());
  const auto in = backward_inputs("capsroute.dynamic_routing_backward", n, grad_v, grad_c, s_in,
                                  iterations, u_in);
  const auto u = u_in.contiguous();
  const auto weight = weight_in.contiguous();
  if (n.B == 0)
    return {at::zeros_like(u), at::zeros_like(weight), zero_grad_bias(n, has_bias, u.options())};
  // The kernels write every entry (grad_bias is made by the launch when has_bias).
  auto grad_u = cuda::scratch(u.sizes(), u.options());
  auto grad_weight = cuda::scratch(weight.sizes(), weight.options());
  auto grad_bias = at::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "dynamic_routing_backward_cuda", [&] {
    cuda_launch::dynamic_routing_backward<scalar_t>(in, u, weight, n, iterations, leaky, detach, eps,
                                                    has_bias, grad_u, grad_weight, grad_bias);
  });
  return {grad_u, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> route_backward_cuda(const at::Tensor& grad_v,
                                                       const c10::optional<at::Tensor>& grad_c,
                                                       const at::Tensor& u_hat_in,
                                                       const at::Tensor& s_in, bool has_bias,
                                                       int64_t iterations, bool leaky,
                                                       bool detach, double eps) {
  const RoutingSizes n = check_route(u_hat_in, c10::nullopt, iterations, eps);
  const cuda::DeviceGuard guard(u_hat_in.device());
  cuda::check_device("capsroute.route_backward", cuda::device_info());
  const auto in = backward_inputs("capsroute.route_backward", n, grad_v, grad_c, s_in,
                                  iterations, u_hat_in);
  const auto u_hat = u_hat_in.contiguous();
  if (n.B == 0) return {at::zeros_like(u_hat), zero_grad_bias(n, has_bias, u_hat.options())};
  auto grad_u_hat = cuda::scratch(u_hat.sizes(), u_hat.options());  // written in full
  auto grad_bias = at::empty({0}, u_hat.options());  // made by the launch when has_bias
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_hat.scalar_type(), "route_backward_cuda", [&] {
    cuda_launch::route_backward<scalar_t>(in, u_hat, n, iterations, leaky, detach, eps, has_bias,
                                          grad_u_hat, grad_bias);
  });
  return {grad_u_hat, grad_bias};
}

void register_impls(torch::Library& m) {
  m.impl("dynamic_routing", &dynamic_routing_cuda);
  m.impl("dynamic_routing_backward", &dynamic_routing_backward_cuda);
  m.impl("route", &route_cuda);
  m.impl("route_backward", &route_backward_cuda);
}

}  // namespace

#ifdef CAPSROUTE_EMULATE
// The kernels run by the CPU emulation (csrc/emu/), on CPU tensors, as the ops of a separate
// namespace that only the tests load.
TORCH_LIBRARY(capsroute_emu, m) { define_ops(m); }
TORCH_LIBRARY_IMPL(capsroute_emu, CPU, m) { register_impls(m); }
#else
TORCH_LIBRARY_IMPL(capsroute, CUDA, m) { register_impls(m); }
#endif

}  // namespace capsroute
