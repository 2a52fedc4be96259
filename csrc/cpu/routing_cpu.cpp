// CPU kernels of the capsroute ops.
//
// Work is split over a FIXED partition of the input capsules into chunks (it depends on
// N_in only, never on the thread count), and each chunk walks every batch element. Per
// (b, i) the predictions u_hat[b, i] ([N_out, D_out], a few hundred numbers) are made in a
// thread-local buffer and dropped: for dynamic_routing they are recomputed from W[i] and
// u[b, i] in every pass, so u_hat, the logits and the coupling coefficients never exist for
// the whole batch. The logits come from the running sums V = v^(1) + ... + v^(t-1)
// (DESIGN.md section 1). Sums over input capsules are formed per chunk and then added in
// chunk order, so results are bit-identical for any number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../routing_math.h"

namespace capsroute {
namespace {

// The partition of input capsules; a constant so results do not depend on the machine.
constexpr int64_t kMaxChunks = 32;

struct Chunks {
  int64_t N_in, count;
  explicit Chunks(int64_t n) : N_in(n), count(std::min<int64_t>(n, kMaxChunks)) {}
  int64_t begin(int64_t c) const { return c * N_in / count; }
  int64_t end(int64_t c) const { return (c + 1) * N_in / count; }
};

template <typename acc_t>
inline acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  // Eight independent partial sums in a fixed order: vectorisable without -ffast-math,
  // and the same result on every run.
  acc_t lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int l = 0; l < 8; ++l) lane[l] += x[d + l] * y[d + l];
  for (; d < n; ++d) lane[0] += x[d] * y[d];
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

template <typename acc_t>
inline void axpy(acc_t a, const acc_t* x, acc_t* y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

// Problem sizes and options as the kernels use them.
struct Problem {
  RoutingSizes n;
  int64_t J;  // N_out * D_out, the length of one prediction vector u_hat[b, i]
  int64_t iterations;
  bool leaky;
  double eps;
};

// c[b, i, :] = softmax_j <u_hat[b, i, j], V[b, j]> (leaky: an extra zero logit).
// `first` marks iteration 1, where V = 0 and the coefficients are uniform.
template <typename acc_t>
inline void coupling(const Problem& p, const acc_t* uh, const acc_t* V, bool first, acc_t* c) {
  const int64_t N_out = p.n.N_out, D_out = p.n.D_out;
  if (first) {
    const acc_t uniform = acc_t(1) / acc_t(N_out + (p.leaky ? 1 : 0));
    for (int64_t j = 0; j < N_out; ++j) c[j] = uniform;
    return;
  }
  acc_t m = p.leaky ? acc_t(0) : -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < N_out; ++j) {
    c[j] = dot(uh + j * D_out, V + j * D_out, D_out);
    m = std::max(m, c[j]);
  }
  acc_t sum = p.leaky ? std::exp(-m) : acc_t(0);
  for (int64_t j = 0; j < N_out; ++j) {
    c[j] = std::exp(c[j] - m);
    sum += c[j];
  }
  const acc_t inv = acc_t(1) / sum;
  for (int64_t j = 0; j < N_out; ++j) c[j] *= inv;
}

// Back through the softmax: gbeta_j = c_j (gc_j - sum_k c_k gc_k), k over real outputs
// (the same formula holds for the leaky softmax, whose extra logit is a constant).
template <typename acc_t>
inline void softmax_backward(int64_t N_out, const acc_t* c, acc_t* g) {
  acc_t cg = 0;
  for (int64_t j = 0; j < N_out; ++j) cg += c[j] * g[j];
  for (int64_t j = 0; j < N_out; ++j) g[j] = c[j] * (g[j] - cg);
}

// Predictions for route(): read from the u_hat tensor the caller gave.
template <typename scalar_t, typename acc_t>
struct GivenPredictions {
  const scalar_t* u_hat;  // [B, N_in, J]
  scalar_t* grad_u_hat;   // [B, N_in, J], backward only
  int64_t N_in, J;

  void prepare(int64_t /*i*/) {}
  void predict(int64_t b, int64_t i, acc_t* uh) const {
    const scalar_t* src = u_hat + (b * N_in + i) * J;
    for (int64_t e = 0; e < J; ++e) uh[e] = static_cast<acc_t>(src[e]);
  }
  void begin_grad(int64_t /*i*/) {}
  void add_grad(int64_t b, int64_t i, const acc_t* g_uh) {
    scalar_t* dst = grad_u_hat + (b * N_in + i) * J;
    for (int64_t e = 0; e < J; ++e) dst[e] = static_cast<scalar_t>(g_uh[e]);
  }
  void end_grad(int64_t /*i*/) {}
};

// Predictions for dynamic_routing(): u_hat[b, i] = W[i] u[b, i], recomputed on demand.
// W[i] ([J, D_in] in memory) is transposed once per capsule into Wt ([D_in, J]) so that
// the product is a run of contiguous, vectorisable axpys over J.
template <typename scalar_t, typename acc_t>
struct WeightPredictions {
  const scalar_t* u;       // [B, N_in, D_in]
  const scalar_t* W;       // [N_in, J, D_in]
  scalar_t* grad_u;        // [B, N_in, D_in], backward only
  scalar_t* grad_W;        // [N_in, J, D_in], backward only
  int64_t N_in, J, D_in;
  std::vector<acc_t> Wt, gWt, ub;  // per-thread buffers

  void prepare(int64_t i) {
    Wt.resize(D_in * J);
    ub.resize(D_in);
    const scalar_t* w = W + i * J * D_in;
    for (int64_t e = 0; e < J; ++e)
      for (int64_t k = 0; k < D_in; ++k) Wt[k * J + e] = static_cast<acc_t>(w[e * D_in + k]);
  }
  void predict(int64_t b, int64_t i, acc_t* uh) {
    const scalar_t* ui = u + (b * N_in + i) * D_in;
    for (int64_t k = 0; k < D_in; ++k) ub[k] = static_cast<acc_t>(ui[k]);
    std::fill(uh, uh + J, acc_t(0));
    for (int64_t k = 0; k < D_in; ++k) axpy(ub[k], Wt.data() + k * J, uh, J);
  }
  void begin_grad(int64_t /*i*/) { gWt.assign(D_in * J, acc_t(0)); }
  // grad_u[b, i] = W[i]^T g_uh; grad_W[i] += g_uh u[b, i]^T (summed over b in order).
  void add_grad(int64_t b, int64_t i, const acc_t* g_uh) {
    scalar_t* gu = grad_u + (b * N_in + i) * D_in;
    for (int64_t k = 0; k < D_in; ++k) {
      gu[k] = static_cast<scalar_t>(dot(Wt.data() + k * J, g_uh, J));
      axpy(ub[k], g_uh, gWt.data() + k * J, J);
    }
  }
  void end_grad(int64_t i) {
    scalar_t* gw = grad_W + i * J * D_in;
    for (int64_t e = 0; e < J; ++e)
      for (int64_t k = 0; k < D_in; ++k) gw[e * D_in + k] = static_cast<scalar_t>(gWt[k * J + e]);
  }
};

// V_prev[t] = v^(1) + ... + v^(t) for t = 0 .. iterations-1 (V_prev[0] = 0), v = squash(s).
template <typename acc_t>
void running_sums(const Problem& p, const acc_t* s, acc_t* V_prev) {
  const int64_t B = p.n.B, J = p.J, D_out = p.n.D_out, N_out = p.n.N_out;
  const acc_t eps = static_cast<acc_t>(p.eps);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(V_prev + b * J, V_prev + (b + 1) * J, acc_t(0));
      for (int64_t t = 1; t < p.iterations; ++t) {
        const acc_t* st = s + ((t - 1) * B + b) * J;
        const acc_t* prev = V_prev + ((t - 1) * B + b) * J;
        acc_t* cur = V_prev + (t * B + b) * J;
        for (int64_t j = 0; j < N_out; ++j) {
          const acc_t f = squash_scale(dot(st + j * D_out, st + j * D_out, D_out), eps);
          for (int64_t d = 0; d < D_out; ++d)
            cur[j * D_out + d] = prev[j * D_out + d] + f * st[j * D_out + d];
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Forward.
template <typename scalar_t, typename acc_t, typename Source>
void routing_forward(const Problem& p, Source proto, const scalar_t* bias, scalar_t* v_out,
                     scalar_t* c_out, acc_t* s_all) {
  const int64_t B = p.n.B, N_in = p.n.N_in, N_out = p.n.N_out, D_out = p.n.D_out, J = p.J;
  const acc_t eps = static_cast<acc_t>(p.eps);
  const Chunks chunks(N_in);
  std::vector<acc_t> V(B * J, acc_t(0));                 // running sum of v
  std::vector<acc_t> partial(chunks.count * B * J);      // per-chunk sums over i

  for (int64_t t = 1; t <= p.iterations; ++t) {
    const bool first = t == 1, last = t == p.iterations;
    at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
      Source src = proto;
      std::vector<acc_t> uh(J), c(N_out);
      for (int64_t ch = c0; ch < c1; ++ch) {
        acc_t* part = partial.data() + ch * B * J;
        std::fill(part, part + B * J, acc_t(0));
        for (int64_t i = chunks.begin(ch); i < chunks.end(ch); ++i) {
          src.prepare(i);
          for (int64_t b = 0; b < B; ++b) {
            src.predict(b, i, uh.data());
            coupling(p, uh.data(), V.data() + b * J, first, c.data());
            if (last && c_out != nullptr)
              for (int64_t j = 0; j < N_out; ++j)
                c_out[(b * N_in + i) * N_out + j] = static_cast<scalar_t>(c[j]);
            for (int64_t j = 0; j < N_out; ++j)
              axpy(c[j], uh.data() + j * D_out, part + b * J + j * D_out, D_out);
          }
        }
      }
    });
    // s = sum over chunks (in chunk order) + bias; v = squash(s); V += v.
    acc_t* s_t = s_all + (t - 1) * B * J;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* s = s_t + b * J;
        for (int64_t e = 0; e < J; ++e)
          s[e] = bias != nullptr ? static_cast<acc_t>(bias[e]) : acc_t(0);
        for (int64_t ch = 0; ch < chunks.count; ++ch) {
          const acc_t* part = partial.data() + ch * B * J + b * J;
          for (int64_t e = 0; e < J; ++e) s[e] += part[e];
        }
        for (int64_t j = 0; j < N_out; ++j) {
          const acc_t* sj = s + j * D_out;
          const acc_t f = squash_scale(dot(sj, sj, D_out), eps);
          for (int64_t d = 0; d < D_out; ++d) {
            V[b * J + j * D_out + d] += f * sj[d];
            if (last) v_out[b * J + j * D_out + d] = static_cast<scalar_t>(f * sj[d]);
          }
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------
// Backward (DESIGN.md section 1). gs[t] = dL/ds^(t) is found by a sweep t = r .. 1 that
// carries G = sum over later iterations of sum_i gbeta_ij u_hat_ij (one pass over the
// input capsules per iteration); a last pass, local per (b, i), forms g_uh and hands it to
// the source, which writes grad_u_hat or contracts it into grad_u and grad_weight.
template <typename scalar_t, typename acc_t, typename Source>
void routing_backward(const Problem& p, Source proto, bool detach, const acc_t* grad_v,
                      const acc_t* grad_c, const acc_t* s_all, scalar_t* grad_bias) {
  const int64_t B = p.n.B, N_in = p.n.N_in, N_out = p.n.N_out, D_out = p.n.D_out, J = p.J;
  const int64_t r = p.iterations;
  const acc_t eps = static_cast<acc_t>(p.eps);
  const Chunks chunks(N_in);

  std::vector<acc_t> V_prev(r * B * J);
  running_sums(p, s_all, V_prev.data());
  std::vector<acc_t> gs(r * B * J, acc_t(0));
  std::vector<acc_t> G(B * J, acc_t(0));
  std::vector<acc_t> partial(chunks.count * B * J);
  // With detach only the last iteration carries gradient, and c^(r) is a constant.
  const int64_t t_min = detach ? r : 1;

  for (int64_t t = r; t >= t_min; --t) {
    // gs^(t) = J_squash(s^(t))^T ([t == r] grad_v + G)
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t j = 0; j < N_out; ++j) {
          const int64_t o = b * J + j * D_out;
          const acc_t* s = s_all + (t - 1) * B * J + o;
          acc_t* g = gs.data() + (t - 1) * B * J + o;
          // gv = [t == r] grad_v + G, formed in place in g, then mapped through squash.
          for (int64_t d = 0; d < D_out; ++d) g[d] = G[o + d] + (t == r ? grad_v[o + d] : acc_t(0));
          acc_t a, bb;
          squash_vjp_coeffs(dot(s, s, D_out), dot(s, g, D_out), eps, &a, &bb);
          for (int64_t d = 0; d < D_out; ++d) g[d] = a * g[d] + bb * s[d];
        }
      }
    });
    if (t == t_min) break;  // no earlier iteration left that G would feed
    // G += sum_i gbeta^(t)_ij u_hat_ij, per chunk then in chunk order.
    at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
      Source src = proto;
      std::vector<acc_t> uh(J), c(N_out), g(N_out);
      for (int64_t ch = c0; ch < c1; ++ch) {
        acc_t* part = partial.data() + ch * B * J;
        std::fill(part, part + B * J, acc_t(0));
        for (int64_t i = chunks.begin(ch); i < chunks.end(ch); ++i) {
          src.prepare(i);
          for (int64_t b = 0; b < B; ++b) {
            src.predict(b, i, uh.data());
            coupling(p, uh.data(), V_prev.data() + ((t - 1) * B + b) * J, false, c.data());
            const acc_t* gst = gs.data() + ((t - 1) * B + b) * J;
            for (int64_t j = 0; j < N_out; ++j) {
              g[j] = dot(gst + j * D_out, uh.data() + j * D_out, D_out);
              if (t == r && grad_c != nullptr) g[j] += grad_c[(b * N_in + i) * N_out + j];
            }
            softmax_backward(N_out, c.data(), g.data());
            for (int64_t j = 0; j < N_out; ++j)
              axpy(g[j], uh.data() + j * D_out, part + b * J + j * D_out, D_out);
          }
        }
      }
    });
    at::parallel_for(0, B * J, 1024, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e)
        for (int64_t ch = 0; ch < chunks.count; ++ch) G[e] += partial[ch * B * J + e];
    });
  }

  if (grad_bias != nullptr) {
    for (int64_t e = 0; e < J; ++e) {
      acc_t acc = 0;
      for (int64_t t = t_min; t <= r; ++t)
        for (int64_t b = 0; b < B; ++b) acc += gs[((t - 1) * B + b) * J + e];
      grad_bias[e] = static_cast<scalar_t>(acc);
    }
  }

  // g_uh_ij = sum_t c^(t)_ij gs^(t)_j + gbeta^(t)_ij V^(t-1)_j, local per (b, i).
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    Source src = proto;
    std::vector<acc_t> uh(J), g_uh(J), c(N_out), g(N_out);
    for (int64_t ch = c0; ch < c1; ++ch) {
      for (int64_t i = chunks.begin(ch); i < chunks.end(ch); ++i) {
        src.prepare(i);
        src.begin_grad(i);
        for (int64_t b = 0; b < B; ++b) {
          src.predict(b, i, uh.data());
          std::fill(g_uh.begin(), g_uh.end(), acc_t(0));
          for (int64_t t = t_min; t <= r; ++t) {
            const acc_t* Vt = V_prev.data() + ((t - 1) * B + b) * J;
            const acc_t* gst = gs.data() + ((t - 1) * B + b) * J;
            coupling(p, uh.data(), Vt, t == 1, c.data());
            for (int64_t j = 0; j < N_out; ++j)
              axpy(c[j], gst + j * D_out, g_uh.data() + j * D_out, D_out);
            if (t == 1 || detach) continue;  // V^(0) = 0; with detach c^(r) is constant
            for (int64_t j = 0; j < N_out; ++j) {
              g[j] = dot(gst + j * D_out, uh.data() + j * D_out, D_out);
              if (t == r && grad_c != nullptr) g[j] += grad_c[(b * N_in + i) * N_out + j];
            }
            softmax_backward(N_out, c.data(), g.data());
            for (int64_t j = 0; j < N_out; ++j)
              axpy(g[j], Vt + j * D_out, g_uh.data() + j * D_out, D_out);
          }
          src.add_grad(b, i, g_uh.data());
        }
        src.end_grad(i);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Op entry points: validate, make contiguous, allocate, dispatch on dtype.

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

Problem make_problem(const RoutingSizes& n, int64_t iterations, bool leaky, double eps) {
  return Problem{n, n.N_out * n.D_out, iterations, leaky, eps};
}

template <typename scalar_t>
const scalar_t* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_outputs(const at::Tensor& like,
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_routing_cpu(
    const at::Tensor& u_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
    int64_t iterations, bool leaky, bool detach, double eps, bool return_coupling) {
  const RoutingSizes n = check_dynamic_routing(u_in, weight_in, bias_in, iterations, eps);
  (void)detach;  // the forward values do not depend on it
  const auto u = u_in.contiguous();
  const auto weight = weight_in.contiguous();
  c10::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  auto [v, c, s] = forward_outputs(u, n, iterations, return_coupling);
  if (n.B == 0) return {v, c, s};
  const Problem p = make_problem(n, iterations, leaky, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "dynamic_routing_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    WeightPredictions<scalar_t, acc_t> src{u.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                           nullptr, nullptr, n.N_in, p.J, n.D_in, {}, {}, {}};
    routing_forward<scalar_t, acc_t>(p, src, data_or_null<scalar_t>(bias), v.data_ptr<scalar_t>(),
                                     return_coupling ? c.data_ptr<scalar_t>() : nullptr,
                                     s.data_ptr<acc_t>());
  });
  return {v, c, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cpu(const at::Tensor& u_hat_in,
                                                         const c10::optional<at::Tensor>& bias_in,
                                                         int64_t iterations, bool leaky,
                                                         bool detach, double eps,
                                                         bool return_coupling) {
  const RoutingSizes n = check_route(u_hat_in, bias_in, iterations, eps);
  (void)detach;
  const auto u_hat = u_hat_in.contiguous();
  c10::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  auto [v, c, s] = forward_outputs(u_hat, n, iterations, return_coupling);
  if (n.B == 0) return {v, c, s};
  const Problem p = make_problem(n, iterations, leaky, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_hat.scalar_type(), "route_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GivenPredictions<scalar_t, acc_t> src{u_hat.data_ptr<scalar_t>(), nullptr, n.N_in, p.J};
    routing_forward<scalar_t, acc_t>(p, src, data_or_null<scalar_t>(bias), v.data_ptr<scalar_t>(),
                                     return_coupling ? c.data_ptr<scalar_t>() : nullptr,
                                     s.data_ptr<acc_t>());
  });
  return {v, c, s};
}

// The incoming gradients and the saved sums, as contiguous accumulation-type tensors.
struct BackwardInputs {
  at::Tensor grad_v, grad_c, s;
};

BackwardInputs backward_inputs(const char* op, const RoutingSizes& n, const at::Tensor& grad_v,
                               const c10::optional<at::Tensor>& grad_c, const at::Tensor& s,
                               int64_t iterations, at::ScalarType dtype) {
  check_backward(op, n, grad_v, grad_c, s, iterations);
  const auto acc = acc_type_of(dtype);
  BackwardInputs in;
  in.grad_v = grad_v.to(acc).contiguous();
  if (grad_c.has_value()) in.grad_c = grad_c->to(acc).contiguous();
  in.s = s.to(acc).contiguous();
  return in;
}

template <typename acc_t>
const acc_t* data_if_defined(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_routing_backward_cpu(
    const at::Tensor& grad_v, const c10::optional<at::Tensor>& grad_c, const at::Tensor& u_in,
    const at::Tensor& weight_in, const at::Tensor& s_in, bool has_bias, int64_t iterations,
    bool leaky, bool detach, double eps) {
  const RoutingSizes n = check_dynamic_routing(u_in, weight_in, c10::nullopt, iterations, eps);
  const auto in = backward_inputs("capsroute.dynamic_routing_backward", n, grad_v, grad_c, s_in,
                                  iterations, u_in.scalar_type());
  const auto u = u_in.contiguous();
  const auto weight = weight_in.contiguous();
  auto grad_u = at::empty_like(u);
  auto grad_weight = at::empty_like(weight);
  auto grad_bias = has_bias ? at::zeros({n.N_out, n.D_out}, u.options()) : at::empty({0}, u.options());
  if (n.B == 0) return {grad_u, grad_weight.zero_(), grad_bias};
  const Problem p = make_problem(n, iterations, leaky, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "dynamic_routing_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    WeightPredictions<scalar_t, acc_t> src{u.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                           grad_u.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(),
                                           n.N_in, p.J, n.D_in, {}, {}, {}};
    routing_backward<scalar_t, acc_t>(p, src, detach, in.grad_v.data_ptr<acc_t>(),
                                      data_if_defined<acc_t>(in.grad_c), in.s.data_ptr<acc_t>(),
                                      has_bias ? grad_bias.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_u, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> route_backward_cpu(const at::Tensor& grad_v,
                                                      const c10::optional<at::Tensor>& grad_c,
                                                      const at::Tensor& u_hat_in,
                                                      const at::Tensor& s_in, bool has_bias,
                                                      int64_t iterations, bool leaky, bool detach,
                                                      double eps) {
  const RoutingSizes n = check_route(u_hat_in, c10::nullopt, iterations, eps);
  const auto in = backward_inputs("capsroute.route_backward", n, grad_v, grad_c, s_in, iterations,
                                  u_hat_in.scalar_type());
  const auto u_hat = u_hat_in.contiguous();
  auto grad_u_hat = at::empty_like(u_hat);
  auto grad_bias = has_bias ? at::zeros({n.N_out, n.D_out}, u_hat.options())
                            : at::empty({0}, u_hat.options());
  if (n.B == 0) return {grad_u_hat, grad_bias};
  const Problem p = make_problem(n, iterations, leaky, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_hat.scalar_type(), "route_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GivenPredictions<scalar_t, acc_t> src{u_hat.data_ptr<scalar_t>(), grad_u_hat.data_ptr<scalar_t>(),
                                          n.N_in, p.J};
    routing_backward<scalar_t, acc_t>(p, src, detach, in.grad_v.data_ptr<acc_t>(),
                                      data_if_defined<acc_t>(in.grad_c), in.s.data_ptr<acc_t>(),
                                      has_bias ? grad_bias.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_u_hat, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(capsroute, CPU, m) {
  m.impl("dynamic_routing", &dynamic_routing_cpu);
  m.impl("dynamic_routing_backward", &dynamic_routing_backward_cpu);
  m.impl("route", &route_cpu);
  m.impl("route_backward", &route_backward_cpu);
}

}  // namespace capsroute
