// The CUDA launch sequences, one per op, declared for the op entry points
// (routing_cuda.cu), defined in routing_launch.cuh and instantiated per dtype in
// instantiate_*.cu. Outputs are allocated by the caller; B > 0.
#pragma once

#include <ATen/ATen.h>

#include "../checks.h"
#include "../op_utils.h"

namespace capsroute {
namespace cuda_launch {
template <typename scalar_t>
void dynamic_routing_forward(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                             const RoutingSizes&, int64_t, bool, double, at::Tensor&, at::Tensor&,
                             at::Tensor&);
template <typename scalar_t>
void route_forward(const at::Tensor&, const c10::optional<at::Tensor>&, const RoutingSizes&,
                   int64_t, bool, double, at::Tensor&, at::Tensor&, at::Tensor&);
template <typename scalar_t>
void dynamic_routing_backward(const BackwardInputs&, const at::Tensor&, const at::Tensor&,
                              const RoutingSizes&, int64_t, bool, bool, double, bool, at::Tensor&,
                              at::Tensor&, at::Tensor&);
template <typename scalar_t>
void route_backward(const BackwardInputs&, const at::Tensor&, const RoutingSizes&, int64_t, bool,
                    bool, double, bool, at::Tensor&, at::Tensor&);
}  // namespace cuda_launch
}  // namespace capsroute
