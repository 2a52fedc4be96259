// The environment variables the ops read at every call, for measuring one choice against
// another or capping memory; shared by the CPU and CUDA code.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace capsroute {

// The whole number in the environment variable `name`, or -1 where it is unset or empty;
// anything but a whole number >= 0 is an error saying it must be `what`.
inline int64_t env_number(const char* name, const char* what) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return -1;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && v >= 0, "capsroute: ", name, " must be ", what,
                    ", but is '", s, "'");
  return v;
}

// How much memory a backward may spend keeping what its sweep computes for its last pass
// (the couplings c^(t) and the logits' gradients of iterations 2..r):
// CAPSROUTE_COUPLING_CACHE_MB, 1024 MiB unless set; 0 keeps none (least memory: the last pass
// recomputes them; on the CPU the same bits, on CUDA the same to rounding). The MNIST layer at
// B = 128 keeps 24 MB, against the 94 MB that u_hat alone would take.
inline int64_t coupling_cache_bytes() {
  const int64_t mb =
      env_number("CAPSROUTE_COUPLING_CACHE_MB", "a whole number of MiB, 0 or more");
  return mb < 0 ? int64_t(1024) << 20 : std::min<int64_t>(mb, int64_t(1) << 40) << 20;
}

}  // namespace capsroute
