// Scalar math shared by the CPU and CUDA kernels: the squash nonlinearity and its Jacobian.
// Header-only and free of torch headers so that it compiles in host and device code alike.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define CAPSROUTE_HD __host__ __device__ __forceinline__
#else
#define CAPSROUTE_HD inline
#endif

namespace capsroute {

// squash(s) = scale(|s|^2) * s with scale(n2) = n2 / ((1 + n2) * sqrt(n2 + eps)).
template <typename T>
CAPSROUTE_HD T squash_scale(T n2, T eps) {
  using std::sqrt;
  return n2 / ((T(1) + n2) * sqrt(n2 + eps));
}

// d scale / d n2, written so that it stays finite at n2 = 0 when eps > 0:
// scale'(n2) = (1 / ((1 + n2) sqrt(n2 + eps))) * (1 / (1 + n2) - n2 / (2 (n2 + eps))).
template <typename T>
CAPSROUTE_HD T squash_scale_grad(T n2, T eps) {
  using std::sqrt;
  const T inv = T(1) / ((T(1) + n2) * sqrt(n2 + eps));
  return inv * (T(1) / (T(1) + n2) - n2 / (T(2) * (n2 + eps)));
}

// The vector-Jacobian product of squash at s for an incoming gradient gv:
//   gs = scale * gv + 2 scale'(n2) <s, gv> s.
// Callers compute n2 = <s, s> and sg = <s, gv>; this returns the two coefficients
// (gs = a * gv + b * s).
template <typename T>
CAPSROUTE_HD void squash_vjp_coeffs(T n2, T sg, T eps, T* a, T* b) {
  *a = squash_scale(n2, eps);
  *b = T(2) * squash_scale_grad(n2, eps) * sg;
}

}  // namespace capsroute
