// Input validation shared by the CPU and CUDA implementations of every capsroute op.
// Each message names the op, the argument, what was expected and what came, so a user can
// act on it without reading this file. capsroute/_ops.py repeats the same checks for the
// fake (meta) kernels that torch.compile traces.
#pragma once

#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <sstream>

namespace capsroute {

// Sizes of one routing problem, named as the math names them (DESIGN.md section 1).
struct RoutingSizes {
  int64_t B = 0;      // batch
  int64_t N_in = 0;   // input capsules
  int64_t N_out = 0;  // output capsules
  int64_t D_in = 0;   // input capsule dims (0 for route(): predictions are given)
  int64_t D_out = 0;  // output capsule dims
};

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
          t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
      op, ": expected ", name, " to be float32, float64, float16 or bfloat16, but got ",
      t.scalar_type());
}

inline void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                       const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, op, ": expected ", name, " to be a ", rank,
                    "-D tensor ", layout, ", but got a ", t.dim(), "-D tensor of shape ",
                    shape_str(t));
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                       int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, op, ": expected ", name, ".shape[", dim,
                    "] == ", expected, " (", what, "), but got ", name, " of shape ",
                    shape_str(t));
}

inline void check_positive(const char* op, const char* name, const at::Tensor& t,
                           int64_t dim, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) >= 1, op, ": expected ", name, ".shape[", dim,
                    "] (", what, ") to be at least 1, but got ", name, " of shape ",
                    shape_str(t));
}

inline void check_same(const char* op, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": expected ", name,
                   " to have the dtype of ", ref_name, " (", ref.scalar_type(),
                   "), but got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name,
              " to be on the device of ", ref_name, " (", ref.device(), "), but got ",
              t.device());
}

inline void check_options(const char* op, int64_t iterations, double eps) {
  TORCH_CHECK_VALUE(iterations >= 1, op, ": expected iterations >= 1, but got ",
                    iterations);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op,
                    ": expected eps to be finite and >= 0, but got ", eps);
}

inline void check_bias(const char* op, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& ref, const char* ref_name,
                       const RoutingSizes& n) {
  if (!bias.has_value()) return;
  check_rank(op, "bias", *bias, 2, "[N_out, D_out]");
  check_size(op, "bias", *bias, 0, n.N_out, "N_out");
  check_size(op, "bias", *bias, 1, n.D_out, "D_out");
  check_same(op, "bias", *bias, ref_name, ref);
}

// dynamic_routing(u [B, N_in, D_in], weight [N_in, N_out, D_out, D_in], bias [N_out, D_out]?)
inline RoutingSizes check_dynamic_routing(const at::Tensor& u, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias,
                                          int64_t iterations, double eps) {
  const char* op = "capsroute.dynamic_routing";
  check_float_tensor(op, "u", u);
  check_rank(op, "u", u, 3, "[B, N_in, D_in]");
  check_rank(op, "weight", weight, 4, "[N_in, N_out, D_out, D_in]");
  check_same(op, "weight", weight, "u", u);
  check_positive(op, "u", u, 1, "N_in");
  check_positive(op, "u", u, 2, "D_in");
  check_size(op, "weight", weight, 0, u.size(1), "N_in, from u.shape[1]");
  check_size(op, "weight", weight, 3, u.size(2), "D_in, from u.shape[2]");
  check_positive(op, "weight", weight, 1, "N_out");
  check_positive(op, "weight", weight, 2, "D_out");
  RoutingSizes n{u.size(0), u.size(1), weight.size(1), u.size(2), weight.size(2)};
  check_bias(op, bias, u, "u", n);
  check_options(op, iterations, eps);
  return n;
}

// route(u_hat [B, N_in, N_out, D_out], bias [N_out, D_out]?)
inline RoutingSizes check_route(const at::Tensor& u_hat,
                                const c10::optional<at::Tensor>& bias, int64_t iterations,
                                double eps) {
  const char* op = "capsroute.route";
  check_float_tensor(op, "u_hat", u_hat);
  check_rank(op, "u_hat", u_hat, 4, "[B, N_in, N_out, D_out]");
  check_positive(op, "u_hat", u_hat, 1, "N_in");
  check_positive(op, "u_hat", u_hat, 2, "N_out");
  check_positive(op, "u_hat", u_hat, 3, "D_out");
  RoutingSizes n{u_hat.size(0), u_hat.size(1), u_hat.size(2), 0, u_hat.size(3)};
  check_bias(op, bias, u_hat, "u_hat", n);
  check_options(op, iterations, eps);
  return n;
}

// The saved state of the forward and the incoming gradients of a backward op.
inline void check_backward(const char* op, const RoutingSizes& n, const at::Tensor& grad_v,
                           const c10::optional<at::Tensor>& grad_c, const at::Tensor& s,
                           int64_t iterations) {
  check_rank(op, "grad_v", grad_v, 3, "[B, N_out, D_out]");
  TORCH_CHECK_VALUE(grad_v.size(0) == n.B && grad_v.size(1) == n.N_out &&
                        grad_v.size(2) == n.D_out,
                    op, ": expected grad_v of shape [", n.B, ", ", n.N_out, ", ", n.D_out,
                    "], but got ", shape_str(grad_v));
  check_rank(op, "s", s, 4, "[iterations, B, N_out, D_out]");
  TORCH_CHECK_VALUE(s.size(0) == iterations && s.size(1) == n.B && s.size(2) == n.N_out &&
                        s.size(3) == n.D_out,
                    op, ": expected s of shape [", iterations, ", ", n.B, ", ", n.N_out,
                    ", ", n.D_out, "], but got ", shape_str(s));
  if (grad_c.has_value()) {
    check_rank(op, "grad_c", *grad_c, 3, "[B, N_in, N_out]");
    TORCH_CHECK_VALUE(grad_c->size(0) == n.B && grad_c->size(1) == n.N_in &&
                          grad_c->size(2) == n.N_out,
                      op, ": expected grad_c of shape [", n.B, ", ", n.N_in, ", ", n.N_out,
                      "], but got ", shape_str(*grad_c));
  }
}

}  // namespace capsroute
