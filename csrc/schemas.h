// The capsroute operator schemas (documented in csrc/capsroute.cpp), in one place for the
// library's definition and for the CPU emulation of the CUDA kernels used by the tests
// (csrc/emu/), which defines the same ops under another namespace.
#pragma once

#include <torch/library.h>

namespace capsroute {

inline void define_ops(torch::Library& m) {
  m.def(
      "dynamic_routing(Tensor u, Tensor weight, Tensor? bias, int iterations, bool leaky, "
      "bool detach, float eps, bool return_coupling) -> (Tensor v, Tensor c, Tensor s)");
  m.def(
      "dynamic_routing_backward(Tensor grad_v, Tensor? grad_c, Tensor u, Tensor weight, "
      "Tensor s, bool has_bias, int iterations, bool leaky, bool detach, float eps) "
      "-> (Tensor grad_u, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "route(Tensor u_hat, Tensor? bias, int iterations, bool leaky, bool detach, "
      "float eps, bool return_coupling) -> (Tensor v, Tensor c, Tensor s)");
  m.def(
      "route_backward(Tensor grad_v, Tensor? grad_c, Tensor u_hat, Tensor s, bool has_bias, "
      "int iterations, bool leaky, bool detach, float eps) "
      "-> (Tensor grad_u_hat, Tensor grad_bias)");
}

}  // namespace capsroute
