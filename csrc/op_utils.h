// Host-side helpers shared by the CPU and CUDA implementations of the ops: output
// allocation and the preparation of a backward op's inputs.
#pragma once

#include <torch/types.h>

#include <tuple>

#include "checks.h"

namespace capsroute {

// The kernels accumulate (and keep the saved sums s) in float32 for float, float16 and
// bfloat16 inputs, and in float64 for float64 inputs.
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// (v [B, N_out, D_out], c [B, N_in, N_out] or [0], s [iterations, B, N_out, D_out]).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_outputs(const at::Tensor& like,
                                                                      const RoutingSizes& n,
                                                                      int64_t iterations,
                                                                      bool return_coupling) {
  auto v = at::empty({n.B, n.N_out, n.D_out}, like.options());
  auto c = return_coupling ? at::empty({n.B, n.N_in, n.N_out}, like.options())
                           : at::empty({0}, like.options());
  auto s = at::empty({iterations, n.B, n.N_out, n.D_out},
                     like.options().dtype(acc_type_of(like.scalar_type())));
  return {v, c, s};
}

// The bias gradient before any accumulation: zeros [N_out, D_out], or [0] without a bias.
inline at::Tensor zero_grad_bias(const RoutingSizes& n, bool has_bias,
                                 const at::TensorOptions& options) {
  return has_bias ? at::zeros({n.N_out, n.D_out}, options) : at::empty({0}, options);
}

inline c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return c10::nullopt;
  return t->contiguous();
}

// The incoming gradients and the saved sums, checked and made contiguous tensors on the
// device of `like`: grad_v in like's dtype (the kernels widen it as they read it: under
// autograd it comes in that dtype, so a float16 or bfloat16 backward converts nothing), grad_c
// and s in the accumulation type.
struct BackwardInputs {
  at::Tensor grad_v, grad_c, s;
};

// t with `options`' dtype and device, contiguous: t itself where it already is so
// (at::Tensor::to goes through the dispatcher even when it changes nothing, host time on
// every call).
inline at::Tensor contiguous_as(const at::Tensor& t, const at::TensorOptions& options) {
  const bool as_is = t.scalar_type() == c10::typeMetaToScalarType(options.dtype()) &&
                     t.device() == options.device();
  return (as_is ? t : t.to(options)).contiguous();
}

inline BackwardInputs backward_inputs(const char* op, const RoutingSizes& n,
                                      const at::Tensor& grad_v,
                                      const c10::optional<at::Tensor>& grad_c,
                                      const at::Tensor& s, int64_t iterations,
                                      const at::Tensor& like) {
  check_backward(op, n, grad_v, grad_c, s, iterations);
  const auto opts = like.options().dtype(acc_type_of(like.scalar_type()));
  BackwardInputs in;
  in.grad_v = contiguous_as(grad_v, like.options());
  if (grad_c.has_value()) in.grad_c = contiguous_as(*grad_c, opts);
  in.s = contiguous_as(s, opts);
  return in;
}

}  // namespace capsroute
