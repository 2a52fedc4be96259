// CPU kernels of the capsroute ops.
//
// Work is split over a FIXED partition of the input capsules into chunks (it depends on
// N_in only, never on the thread count). Inside a chunk, the input capsules are routed a
// block of L batch elements at a time, with the batch elements in the SIMD lanes: every
// per-batch array the loops touch is laid out [row][L], a row being one register (L = 8
// for float, 4 for double on AVX2), so the logits, the softmax, the updates and the
// backward's softmax gradient of a block are straight vector code, without shuffles or
// horizontal sums. The last block is padded with zero lanes that are never written out.
//
// The predictions u_hat[b, i] ([N_out, D_out]) of a block are made in registers and kept,
// at most, in a thread-local buffer: for dynamic_routing they are recomputed from W[i] and
// u[b, i] in every pass, so u_hat, the logits and the coupling coefficients never exist
// for the whole batch. The logits come from the running sums V = v^(1) + ... + v^(t-1)
// (DESIGN.md section 1). Sums over input capsules are formed per chunk and then added in
// chunk order, and grad_weight sums over b in a fixed order, so results are bit-identical
// for any number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../op_utils.h"
#include "../routing_math.h"
#include "../switches.h"

namespace capsroute {
namespace {

// The partition of input capsules; a constant so results do not depend on the machine.
constexpr int64_t kMaxChunks = 32;

// One SIMD register of the accumulation type, as a GCC/Clang vector type (AVX2 with
// -march=native, pairs of SSE instructions without it). Batch elements sit in its lanes.
// Plain `for (l < L)` loops over [rows][L] tiles are not enough: GCC 12 vectorises the
// runtime-length loop around them instead and shuffles the tile in memory.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float vec __attribute__((vector_size(32)));
  typedef float unaligned __attribute__((vector_size(32), aligned(alignof(float)), may_alias));
  typedef uint32_t bits __attribute__((vector_size(32)));
};
template <>
struct Simd<double> {
  typedef double vec __attribute__((vector_size(32)));
  typedef double unaligned __attribute__((vector_size(32), aligned(alignof(double)), may_alias));
  typedef uint64_t bits __attribute__((vector_size(32)));
};
template <typename T>
using Vec = typename Simd<T>::vec;

// Buffers start on a cache line, so that no row of L lanes straddles two lines (a split
// store also cannot be forwarded to the load that reads it back, which the running sums in
// the loops do all the time).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  friend bool operator==(const CacheLineAllocator&, const CacheLineAllocator&) { return true; }
};
template <typename T>
using Buffer = std::vector<T, CacheLineAllocator<T>>;

// Batch elements per block.
template <typename T>
constexpr int kLanes = sizeof(Vec<T>) / sizeof(T);

// Loads and stores of one register at any element-aligned address; by value, so that
// register tiles never have to live in memory.
template <typename T>
inline Vec<T> load(const T* p) {
  return *reinterpret_cast<const typename Simd<T>::unaligned*>(p);
}
template <typename T>
inline void store(T* p, Vec<T> v) {
  *reinterpret_cast<typename Simd<T>::unaligned*>(p) = v;
}
template <typename T>
inline Vec<T> splat(T x) {
  Vec<T> v;
  for (int l = 0; l < kLanes<T>; ++l) v[l] = x;
  return v;
}

// The operand a register tile reuses across its rows, pinned to a register: GCC otherwise
// folds its load into every FMA that uses it, which doubles the loads of the tile (loads,
// not FMAs, bound these tiles on AVX2).
template <typename V>
inline V in_register(V v) {
#if defined(__AVX__) && (defined(__GNUC__) || defined(__clang__))
  asm("" : "+x"(v));
#endif
  return v;
}

// dst[0 .. n) = v[0 .. n) (n <= L) in the output type: one vector store where it can be.
template <typename scalar_t, typename acc_t>
inline void store_first(scalar_t* dst, Vec<acc_t> v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (n == kLanes<acc_t>) {
      store(dst, v);
      return;
    }
  }
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(v[k]);
}

// r[e][l] = r[l][e]: an in-register transpose of one L x L block (route's predictions come
// with the batch in rows; the loops want it in lanes). The shuffles are AVX's unpack,
// shuffle and 128-bit permutes where the build targets AVX.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define CAPSROUTE_SHUFFLE(T, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define CAPSROUTE_SHUFFLE(T, a, b, ...) __builtin_shuffle(a, b, typename Simd<T>::bits{__VA_ARGS__})
#endif
inline void transpose(Vec<float> (&r)[8]) {
  Vec<float> t[8], u[8];
  for (int k = 0; k < 8; k += 2) {  // rows k, k+1 interleaved: elements 0 1 | 4 5, 2 3 | 6 7
    t[k] = CAPSROUTE_SHUFFLE(float, r[k], r[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[k + 1] = CAPSROUTE_SHUFFLE(float, r[k], r[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int k = 0; k < 8; k += 4)  // 4 rows of one element per 128-bit half: e | e + 4
    for (int h = 0; h < 2; ++h) {
      u[k + 2 * h] = CAPSROUTE_SHUFFLE(float, t[k + h], t[k + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[k + 2 * h + 1] =
          CAPSROUTE_SHUFFLE(float, t[k + h], t[k + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int k = 0; k < 4; ++k) {  // halves of rows 0-3 and 4-7 joined
    r[k] = CAPSROUTE_SHUFFLE(float, u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[k + 4] = CAPSROUTE_SHUFFLE(float, u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}
inline void transpose(Vec<double> (&r)[4]) {
  const Vec<double> t0 = CAPSROUTE_SHUFFLE(double, r[0], r[1], 0, 4, 2, 6);
  const Vec<double> t1 = CAPSROUTE_SHUFFLE(double, r[0], r[1], 1, 5, 3, 7);
  const Vec<double> t2 = CAPSROUTE_SHUFFLE(double, r[2], r[3], 0, 4, 2, 6);
  const Vec<double> t3 = CAPSROUTE_SHUFFLE(double, r[2], r[3], 1, 5, 3, 7);
  r[0] = CAPSROUTE_SHUFFLE(double, t0, t2, 0, 1, 4, 5);
  r[1] = CAPSROUTE_SHUFFLE(double, t1, t3, 0, 1, 4, 5);
  r[2] = CAPSROUTE_SHUFFLE(double, t0, t2, 2, 3, 6, 7);
  r[3] = CAPSROUTE_SHUFFLE(double, t1, t3, 2, 3, 6, 7);
}
#undef CAPSROUTE_SHUFFLE

// Batch blocks predicted together: each W entry, once broadcast, feeds kPair FMAs, which
// halves the broadcast loads that bound the prediction tiles.
constexpr int64_t kPair = 2;

// Rows per register tile in the small matrix products. 4 measured faster than 6 or 8 for
// the predictions on Zen 3 (each row costs a broadcast load; the loads, not the FMAs, bound
// the tile).
constexpr int64_t kRows = 4;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

struct Chunks {
  int64_t N_in, count;
  explicit Chunks(int64_t n) : N_in(n), count(std::min<int64_t>(n, kMaxChunks)) {}
  int64_t begin(int64_t c) const { return c * N_in / count; }
  int64_t end(int64_t c) const { return (c + 1) * N_in / count; }
};

// Runs worker(claim) on each thread, where claim() hands out the chunks 0, 1, ... one at a
// time (count and past when none is left). Chunks go to whichever thread comes free, so a
// thread that the OS holds up does not hold the pass up (a fixed split into one range per
// thread waits for the slowest range). Results do not depend on it: each chunk writes only
// its own partial sums, which are added in chunk order afterwards.
template <typename Worker>
void for_each_chunk(const Chunks& chunks, const Worker& worker) {
  std::atomic<int64_t> next{0};
  auto claim = [&] { return next.fetch_add(1, std::memory_order_relaxed); };
  at::parallel_for(0, chunks.count, 1, [&](int64_t, int64_t) { worker(claim); });
}

// Problem sizes and options as the kernels use them.
struct Problem {
  RoutingSizes n;
  int64_t J;  // N_out * D_out, the length of one prediction vector u_hat[b, i]
  int64_t iterations;
  bool leaky;
  double eps;
};

// [blocks][J][L]: the layout of every per-batch array the capsule loops read or write
// (running sums V, gradients gs and G, per-chunk partial sums).
template <typename acc_t>
struct Blocked {
  static constexpr int L = kLanes<acc_t>;
  int64_t B, J, blocks;
  Blocked(int64_t B_, int64_t J_) : B(B_), J(J_), blocks((B_ + L - 1) / L) {}
  int64_t size() const { return blocks * J * L; }
  int64_t block(int64_t blk) const { return blk * J * L; }
  int64_t at(int64_t b, int64_t e) const { return ((b / L) * J + e) * L + b % L; }
  int64_t active(int64_t blk) const { return std::min<int64_t>(L, B - blk * L); }
};

// The bits of `x` read as a `To`: std::bit_cast is C++20, and torch 2.11 (the GPU machine's)
// builds extensions as C++17.
template <typename To, typename From>
inline To bit_cast(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}

// exp(x) for x <= 0 (a logit minus the largest logit), on a whole register: libm's exp
// is a scalar call that GCC vectorises only under -ffast-math, which would also break NaN
// propagation. Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a polynomial for e^r,
// and 2^n put in the exponent bits (n found by the 1.5 * 2^mantissa rounding trick, so no
// float-to-int conversion of a possible NaN). About 1 ulp; below the smallest normal number
// it gives 0; NaN stays NaN.
inline Vec<float> exp_nonpositive(Vec<float> x) {
  using V = Vec<float>;
  using U = Simd<float>::bits;
  constexpr float lo = -87.3365447f;    // log(FLT_MIN)
  constexpr float round = 12582912.0f;  // 1.5 * 2^23
  const V xc = x < lo ? splat(lo) : x;
  const V t = xc * 1.44269504088896341f + round;
  const V n = t - round;
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  // Cephes expf's minimax polynomial.
  V p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const U e = (bit_cast<U>(t) - bit_cast<uint32_t>(round) + 127u) << 23;
  const V y = p * bit_cast<V>(e);
  return x < lo ? V{} : y;
}

inline Vec<double> exp_nonpositive(Vec<double> x) {
  using V = Vec<double>;
  using U = Simd<double>::bits;
  constexpr double lo = -708.39641853226408;   // log(DBL_MIN)
  constexpr double round = 6755399441055744.0;  // 1.5 * 2^52
  const V xc = x < lo ? splat(lo) : x;
  const V t = xc * 1.4426950408889634 + round;
  const V n = t - round;
  V r = xc - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  // Taylor series to r^13: the truncation error, |r|^14 / 14! < 5e-18, is below one ulp.
  V p = splat(1.0 / 6227020800.0);
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const U e = (bit_cast<U>(t) - bit_cast<uint64_t>(round) + 1023u) << 52;
  const V y = p * bit_cast<V>(e);
  return x < lo ? V{} : y;
}

// ---------------------------------------------------------------------------------------
// Routing steps on one batch block. Rows are j (N_out of them) or jd = j * D_out + d (J of
// them); every row holds L lanes.

// out[j] = <x[j, :], y[j, :]> over d, per lane. Four partial sums in a fixed order: one
// running sum would make each row a chain of dependent adds, whose latency, not the adds,
// bounds the loop.
template <typename acc_t>
inline void row_dots(int64_t N_out, int64_t D_out, const acc_t* __restrict__ x,
                     const acc_t* __restrict__ y, acc_t* __restrict__ out) {
  constexpr int L = kLanes<acc_t>;
  for (int64_t j = 0; j < N_out; ++j) {
    const acc_t* xj = x + j * D_out * L;
    const acc_t* yj = y + j * D_out * L;
    Vec<acc_t> a0{}, a1{}, a2{}, a3{};
    int64_t d = 0;
    for (; d + 4 <= D_out; d += 4) {
      a0 += load(xj + d * L) * load(yj + d * L);
      a1 += load(xj + (d + 1) * L) * load(yj + (d + 1) * L);
      a2 += load(xj + (d + 2) * L) * load(yj + (d + 2) * L);
      a3 += load(xj + (d + 3) * L) * load(yj + (d + 3) * L);
    }
    for (; d < D_out; ++d) a0 += load(xj + d * L) * load(yj + d * L);
    store(out + j * L, (a0 + a1) + (a2 + a3));
  }
}

// y[j, d] += a[j] * x[j, d], per lane.
template <typename acc_t>
inline void scale_add(int64_t N_out, int64_t D_out, const acc_t* __restrict__ a,
                      const acc_t* __restrict__ x, acc_t* __restrict__ y) {
  constexpr int L = kLanes<acc_t>;
  for (int64_t j = 0; j < N_out; ++j) {
    const Vec<acc_t> aj = load(a + j * L);
    for (int64_t d = 0; d < D_out; ++d) {
      const int64_t o = (j * D_out + d) * L;
      store(y + o, load(y + o) + aj * load(x + o));
    }
  }
}

// y[j, d] += a[j] * x[j, d] + b[j] * z[j, d], per lane: two scale_adds in one sweep of y.
template <typename acc_t>
inline void scale_add2(int64_t N_out, int64_t D_out, const acc_t* __restrict__ a,
                       const acc_t* __restrict__ x, const acc_t* __restrict__ b,
                       const acc_t* __restrict__ z, acc_t* __restrict__ y) {
  constexpr int L = kLanes<acc_t>;
  for (int64_t j = 0; j < N_out; ++j) {
    const Vec<acc_t> aj = load(a + j * L), bj = load(b + j * L);
    for (int64_t d = 0; d < D_out; ++d) {
      const int64_t o = (j * D_out + d) * L;
      store(y + o, load(y + o) + aj * load(x + o) + bj * load(z + o));
    }
  }
}

// c[j] = softmax over j of the logits in c (leaky: an extra zero logit), per lane.
template <typename acc_t>
inline void softmax_lanes(int64_t N_out, bool leaky, acc_t* __restrict__ c) {
  using V = Vec<acc_t>;
  constexpr int L = kLanes<acc_t>;
  V m = splat(leaky ? acc_t(0) : -std::numeric_limits<acc_t>::infinity());
  for (int64_t j = 0; j < N_out; ++j) {
    const V x = load(c + j * L);
    m = m < x ? x : m;
  }
  V sum = leaky ? exp_nonpositive(-m) : V{};
  for (int64_t j = 0; j < N_out; ++j) {
    const V e = exp_nonpositive(load(c + j * L) - m);
    store(c + j * L, e);
    sum += e;
  }
  const V inv = acc_t(1) / sum;
  for (int64_t j = 0; j < N_out; ++j) store(c + j * L, load(c + j * L) * inv);
}

// Back through the softmax: g_j = c_j (g_j - sum_k c_k g_k), k over real outputs (the same
// formula holds for the leaky softmax, whose extra logit is a constant).
template <typename acc_t>
inline void softmax_backward(int64_t N_out, const acc_t* __restrict__ c, acc_t* __restrict__ g) {
  constexpr int L = kLanes<acc_t>;
  Vec<acc_t> cg{};
  for (int64_t j = 0; j < N_out; ++j) cg += load(c + j * L) * load(g + j * L);
  for (int64_t j = 0; j < N_out; ++j)
    store(g + j * L, load(c + j * L) * (load(g + j * L) - cg));
}

// ---------------------------------------------------------------------------------------
// Prediction sources. The routing loops call prepare(i) for an input capsule i, then
// predict(blk, nb, tile) for nb <= kPair consecutive batch blocks blk, blk + 1, ...: the
// source makes u_hat[b, i] ([J][L] per block, batch in lanes) kRows rows at a time and
// hands each group of rows, still in registers, to tile(e0, b, rows) (rows e0 .. e0 +
// kRows - 1 of block blk + b; those past J are padding). The caller's tile keeps the rows
// or adds them straight into the sums it needs. In the last backward pass the loops also
// call begin_grad(), then per block build g_uh = dL/du_hat[b, i] ([J][L]) in the place
// grad_rows(blk) gives and call add_grad(blk), and finally end_grad(). A source is copied
// per thread, and the copy owns its scratch buffers.

// route(): predictions read from the u_hat tensor the caller gave.
template <typename scalar_t, typename acc_t>
struct GivenPredictions {
  static constexpr int L = kLanes<acc_t>;
  const scalar_t* u_hat;  // [B, N_in, J]
  scalar_t* grad_u_hat;   // [B, N_in, J], backward only
  int64_t B, N_in, J;
  int64_t i = 0;

  void prepare(int64_t i_) { i = i_; }
  template <typename Tile>
  void predict(int64_t blk, int64_t nb, Tile&& tile) const {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t b0 = (blk + b) * L, lanes = std::min<int64_t>(L, B - b0);
      const scalar_t* src = u_hat + (b0 * N_in + i) * J;
      int64_t e0 = 0;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        // Whole L x L blocks: a vector load per batch element and a transpose, where element
        // by element each value cost a load and a lane insert (route's CPU time was mostly
        // this gather).
        for (; lanes == L && e0 + L <= J; e0 += L) {
          Vec<acc_t> block[L];
          for (int l = 0; l < L; ++l) block[l] = load(src + l * N_in * J + e0);
          transpose(block);
          for (int q0 = 0; q0 < L; q0 += kRows) {
            Vec<acc_t> rows[kRows];
            std::copy(block + q0, block + q0 + kRows, rows);
            tile(e0 + q0, b, rows);
          }
        }
      }
      for (; e0 < J; e0 += kRows) {
        Vec<acc_t> rows[kRows] = {};
        for (int q = 0; q < kRows && e0 + q < J; ++q)
          for (int64_t l = 0; l < lanes; ++l)
            rows[q][l] = static_cast<acc_t>(src[l * N_in * J + e0 + q]);
        tile(e0, b, rows);
      }
    }
  }

  Buffer<acc_t> g;  // g_uh of one block
  void begin_grad() {
    if (g.empty()) g.assign(J * L, acc_t(0));
  }
  acc_t* grad_rows(int64_t /*blk*/) { return g.data(); }
  void add_grad(int64_t blk) {
    const int64_t b0 = blk * L, nb = std::min<int64_t>(L, B - b0);
    scalar_t* dst = grad_u_hat + (b0 * N_in + i) * J;
    int64_t e0 = 0;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {  // as predict's gather, the other way
      for (; nb == L && e0 + L <= J; e0 += L) {
        Vec<acc_t> block[L];
        for (int q = 0; q < L; ++q) block[q] = load(g.data() + (e0 + q) * L);
        transpose(block);
        for (int l = 0; l < L; ++l) store(dst + l * N_in * J + e0, block[l]);
      }
    }
    for (int64_t l = 0; l < nb; ++l)
      for (int64_t e = e0; e < J; ++e)
        dst[l * N_in * J + e] = static_cast<scalar_t>(g[e * L + l]);
  }
  void end_grad() {}
};

// The operands of dynamic_routing's predictions in the layout the register tiles read, made
// once per call: u with the batch in lanes, [N_in][blocks][D_in][L], and W as
// [N_in][J_pad][D_pad] in the accumulation type, zero-padded so that the tiles never need a
// remainder loop (padded rows and columns give zeros that are never stored). W is used in
// place where it already has that form (float32 with J and D_in multiples of the tile
// sizes, as in the canonical shapes).
template <typename scalar_t, typename acc_t>
struct WeightOperands {
  static constexpr int L = kLanes<acc_t>;
  Buffer<acc_t> u_blocked, w_padded;
  const acc_t* w = nullptr;

  WeightOperands(const scalar_t* u, const scalar_t* W, int64_t B, int64_t N_in, int64_t J,
                 int64_t D_in) {
    const int64_t blocks = (B + L - 1) / L, Jp = round_up(J, kRows), Dp = round_up(D_in, L);
    u_blocked.assign(N_in * blocks * D_in * L, acc_t(0));
    at::parallel_for(0, N_in, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        acc_t* dst = u_blocked.data() + i * blocks * D_in * L;
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* src = u + (b * N_in + i) * D_in;
          acc_t* d = dst + (b / L) * D_in * L + b % L;
          for (int64_t k = 0; k < D_in; ++k) d[k * L] = static_cast<acc_t>(src[k]);
        }
      }
    });
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (Jp == J && Dp == D_in) {
        w = W;
        return;
      }
    }
    w_padded.assign(N_in * Jp * Dp, acc_t(0));
    at::parallel_for(0, N_in, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t e = 0; e < J; ++e)
          for (int64_t k = 0; k < D_in; ++k)
            w_padded[(i * Jp + e) * Dp + k] = static_cast<acc_t>(W[(i * J + e) * D_in + k]);
    });
    w = w_padded.data();
  }
};

// dynamic_routing(): u_hat[b, i] = W[i] u[b, i], recomputed on demand from WeightOperands.
template <typename scalar_t, typename acc_t>
struct WeightPredictions {
  static constexpr int L = kLanes<acc_t>;
  const acc_t* u;     // [N_in][blocks][D_in][L]
  const acc_t* w;     // [N_in][J_pad][D_pad]
  scalar_t* grad_u;   // [B, N_in, D_in], backward only
  scalar_t* grad_W;   // [N_in, J, D_in], backward only
  int64_t B, N_in, J, D_in;
  int64_t i = 0;
  const acc_t* wi = nullptr;  // W[i], [J_pad][D_pad]
  Buffer<acc_t> urow;         // u[:, i] as rows, [B][D_pad] (backward)
  Buffer<acc_t> g;            // g_uh of every batch block of capsule i, [blocks][J_pad][L]

  int64_t blocks() const { return (B + L - 1) / L; }
  int64_t J_pad() const { return round_up(J, kRows); }
  int64_t D_pad() const { return round_up(D_in, L); }

  void prepare(int64_t i_) {
    i = i_;
    wi = w + i * J_pad() * D_pad();
  }
  const acc_t* ub() const { return u + i * blocks() * D_in * L; }

  template <typename Tile>
  void predict(int64_t blk, int64_t nb, Tile&& tile) const {
    static_assert(kPair == 2);
    if (nb == 2)
      predict_tiles<2>(blk, tile);
    else
      predict_tiles<1>(blk, tile);
  }
  // u_hat[b, i, e] = sum_k W[i, e, k] u[b, i, k]: kRows rows x NB blocks of L lanes stay in
  // registers while k runs; each W entry is broadcast once and multiplied by the lane
  // vectors u[., i, k] of the NB blocks.
  template <int NB, typename Tile>
  void predict_tiles(int64_t blk, Tile& tile) const {
    const int64_t Dp = D_pad(), Jp = J_pad();
    const acc_t* __restrict__ x = ub() + blk * D_in * L;
    const acc_t* __restrict__ w_i = wi;
    for (int64_t e0 = 0; e0 < Jp; e0 += kRows) {
      Vec<acc_t> rows[NB][kRows] = {};
      for (int64_t k = 0; k < D_in; ++k) {
        Vec<acc_t> xk[NB];
        for (int b = 0; b < NB; ++b) xk[b] = in_register(load(x + (b * D_in + k) * L));
        for (int q = 0; q < kRows; ++q) {
          const acc_t w_qk = w_i[(e0 + q) * Dp + k];
          for (int b = 0; b < NB; ++b) rows[b][q] += w_qk * xk[b];
        }
      }
      for (int b = 0; b < NB; ++b) tile(e0, b, rows[b]);
    }
  }

  void begin_grad() {
    const int64_t Dp = D_pad();
    if (g.empty()) {
      urow.assign(B * Dp, acc_t(0));
      g.assign(blocks() * J_pad() * L, acc_t(0));
    }
    const acc_t* x = ub();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < D_in; ++k) urow[b * Dp + k] = x[((b / L) * D_in + k) * L + b % L];
  }

  // g_uh of every block is kept until end_grad.
  acc_t* grad_rows(int64_t blk) { return g.data() + blk * J_pad() * L; }

  // grad_u[b, i] = W[i]^T g_uh[b]. Here the lanes run over k (D_pad is a multiple of L):
  // one accumulator per batch element of the block, each W row loaded once per block.
  void add_grad(int64_t blk) {
    const int64_t Dp = D_pad();
    const int64_t b0 = blk * L, nb = std::min<int64_t>(L, B - b0);
    const acc_t* __restrict__ w_i = wi;
    const acc_t* __restrict__ g_uh = grad_rows(blk);
    for (int64_t k0 = 0; k0 < Dp; k0 += L) {
      Vec<acc_t> acc[L] = {};  // [batch lane], lanes over k
      for (int64_t e = 0; e < J; ++e) {
        const Vec<acc_t> we = in_register(load(w_i + e * Dp + k0));
        for (int l = 0; l < L; ++l) acc[l] += g_uh[e * L + l] * we;
      }
      for (int64_t l = 0; l < nb; ++l)
        store_first<scalar_t, acc_t>(grad_u + ((b0 + l) * N_in + i) * D_in + k0, acc[l],
                                     std::min<int64_t>(L, D_in - k0));
    }
  }

  // grad_W[i, e, k] = sum_b g_uh[b, e] u[b, i, k]: lanes over k again, a tile of kRows rows
  // of W in registers while b runs, the even and the odd b in two sets of accumulators
  // (one set would make each accumulator a chain of B dependent FMAs); the order of the
  // sum is fixed: (even b in order) + (odd b in order).
  void end_grad() {
    const int64_t Dp = D_pad(), Jp = J_pad();
    scalar_t* gw = grad_W + i * J * D_in;
    const acc_t* __restrict__ gi = g.data();
    const acc_t* __restrict__ x = urow.data();
    auto g_of = [&](int64_t b, int64_t e0) { return gi + ((b / L) * Jp + e0) * L + b % L; };
    for (int64_t e0 = 0; e0 < Jp; e0 += kRows)
      for (int64_t k0 = 0; k0 < Dp; k0 += L) {
        Vec<acc_t> even[kRows] = {}, odd[kRows] = {};  // [row], lanes over k
        int64_t b = 0;
        for (; b + 1 < B; b += 2) {
          const acc_t* g0 = g_of(b, e0);
          const acc_t* g1 = g_of(b + 1, e0);
          const Vec<acc_t> x0 = in_register(load(x + b * Dp + k0));
          const Vec<acc_t> x1 = in_register(load(x + (b + 1) * Dp + k0));
          for (int q = 0; q < kRows; ++q) {
            even[q] += g0[q * L] * x0;
            odd[q] += g1[q * L] * x1;
          }
        }
        if (b < B) {
          const acc_t* g0 = g_of(b, e0);
          const Vec<acc_t> x0 = load(x + b * Dp + k0);
          for (int q = 0; q < kRows; ++q) even[q] += g0[q * L] * x0;
        }
        for (int64_t q = 0; q < kRows && e0 + q < J; ++q)
          store_first<scalar_t, acc_t>(gw + (e0 + q) * D_in + k0, even[q] + odd[q],
                                       std::min<int64_t>(L, D_in - k0));
      }
  }
};

// Per-thread scratch of the routing loops, sized once per parallel task, for a pair of
// batch blocks: predictions ([kPair][J_pad][L]); per block and iteration the logits or
// coupling coefficients c and their gradient g ([kPair][iterations][N_out][L]).
template <typename acc_t>
struct Scratch {
  static constexpr int L = kLanes<acc_t>;
  const int64_t uh_size, c_size, iterations;
  Buffer<acc_t> uh_, c_, g_;
  explicit Scratch(const Problem& p)
      : uh_size(round_up(p.J, kRows) * L),
        c_size(p.n.N_out * L),
        iterations(p.iterations),
        uh_(kPair * uh_size, acc_t(0)),
        c_(kPair * iterations * c_size),
        g_(kPair * iterations * c_size) {}
  acc_t* uh(int64_t b) { return uh_.data() + b * uh_size; }
  acc_t* c(int64_t b, int64_t t = 1) { return c_.data() + (b * iterations + t - 1) * c_size; }
  acc_t* g(int64_t b, int64_t t = 1) { return g_.data() + (b * iterations + t - 1) * c_size; }
};

// What the routing loops do with a group of prediction rows (see the prediction sources).
// Rows e0 .. e0 + kRows - 1 of u_hat for one batch block.
template <typename acc_t>
using Rows = Vec<acc_t>[kRows];

// Keep the rows in uh ([J_pad][L]).
template <typename acc_t>
inline void keep_rows(int64_t e0, const Rows<acc_t>& rows, acc_t* __restrict__ uh) {
  constexpr int L = kLanes<acc_t>;
  for (int q = 0; q < kRows; ++q) store(uh + (e0 + q) * L, rows[q]);
}

// y[e] += a * rows[e] for the real rows (a: one coefficient for every row).
template <typename acc_t>
inline void add_rows(int64_t e0, const Rows<acc_t>& rows, int64_t J, acc_t a,
                     acc_t* __restrict__ y) {
  constexpr int L = kLanes<acc_t>;
  for (int q = 0; q < kRows && e0 + q < J; ++q)
    store(y + (e0 + q) * L, load(y + (e0 + q) * L) + a * rows[q]);
}

// The coupling coefficients from the logits in c (softmax over j), or the uniform ones of
// iteration 1.
template <typename acc_t>
inline void coupling_from_logits(const Problem& p, bool first, acc_t* c) {
  constexpr int L = kLanes<acc_t>;
  if (first) {
    std::fill(c, c + p.n.N_out * L, acc_t(1) / acc_t(p.n.N_out + (p.leaky ? 1 : 0)));
    return;
  }
  softmax_lanes(p.n.N_out, p.leaky, c);
}

// V_prev[t] = v^(1) + ... + v^(t) for t = 0 .. iterations-1 (V_prev[0] = 0), v = squash(s),
// blocked; s is [iterations, B, J].
template <typename acc_t>
void running_sums(const Problem& p, const Blocked<acc_t>& lay, const acc_t* s, acc_t* V_prev) {
  const int64_t B = p.n.B, J = p.J, D_out = p.n.D_out, N_out = p.n.N_out;
  const acc_t eps = static_cast<acc_t>(p.eps);
  std::fill(V_prev, V_prev + p.iterations * lay.size(), acc_t(0));
  for (int64_t t = 1; t < p.iterations; ++t) {
    acc_t* cur = V_prev + t * lay.size();
    const acc_t* prev = V_prev + (t - 1) * lay.size();
    for (int64_t b = 0; b < B; ++b) {
      const acc_t* st = s + ((t - 1) * B + b) * J;
      for (int64_t j = 0; j < N_out; ++j) {
        acc_t n2 = 0;
        for (int64_t d = 0; d < D_out; ++d) n2 += st[j * D_out + d] * st[j * D_out + d];
        const acc_t f = squash_scale(n2, eps);
        for (int64_t d = 0; d < D_out; ++d) {
          const int64_t o = lay.at(b, j * D_out + d);
          cur[o] = prev[o] + f * st[j * D_out + d];
        }
      }
    }
  }
}

// total[e] (+)= sum over chunks of partial[ch][e], in chunk order.
template <typename acc_t>
void add_chunks(int64_t count, int64_t size, const acc_t* partial, acc_t* total) {
  at::parallel_for(0, size, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t ch = 0; ch < count; ++ch) {
      const acc_t* __restrict__ part = partial + ch * size;
      acc_t* __restrict__ out = total;
      for (int64_t e = e0; e < e1; ++e) out[e] += part[e];
    }
  });
}

// ---------------------------------------------------------------------------------------
// Forward.
template <typename scalar_t, typename acc_t, typename Source>
void routing_forward(const Problem& p, const Source& proto, const scalar_t* bias, scalar_t* v_out,
                     scalar_t* c_out, acc_t* s_all) {
  constexpr int L = kLanes<acc_t>;
  const int64_t B = p.n.B, N_in = p.n.N_in, N_out = p.n.N_out, D_out = p.n.D_out, J = p.J;
  const acc_t eps = static_cast<acc_t>(p.eps);
  const Chunks chunks(N_in);
  const Blocked<acc_t> lay(B, J);
  Buffer<acc_t> V(lay.size(), acc_t(0));               // running sum of v
  Buffer<acc_t> s(lay.size());                         // s of this iteration
  Buffer<acc_t> partial(chunks.count * lay.size());    // per-chunk sums over i
  const acc_t uniform = acc_t(1) / acc_t(N_out + (p.leaky ? 1 : 0));  // c of iteration 1

  for (int64_t t = 1; t <= p.iterations; ++t) {
    const bool first = t == 1, last = t == p.iterations;
    for_each_chunk(chunks, [&](auto&& claim) {
      Source src = proto;
      Scratch<acc_t> w(p);
      for (int64_t ch = claim(); ch < chunks.count; ch = claim()) {
        acc_t* part = partial.data() + ch * lay.size();
        std::fill(part, part + lay.size(), acc_t(0));
        // Block-major: the running sums and partial sums of the blocks stay in L1 while W
        // streams through.
        for (int64_t blk = 0; blk < lay.blocks; blk += kPair) {
          const int64_t nb = std::min(kPair, lay.blocks - blk);
          for (int64_t i = chunks.begin(ch); i < chunks.end(ch); ++i) {
            src.prepare(i);
            if (first) {
              // Uniform coefficients: the rows go straight into the sums.
              src.predict(blk, nb, [&](int64_t e0, int64_t b, const Rows<acc_t>& rows) {
                add_rows(e0, rows, J, uniform, part + lay.block(blk + b));
              });
            } else {
              src.predict(blk, nb, [&](int64_t e0, int64_t b, const Rows<acc_t>& rows) {
                keep_rows(e0, rows, w.uh(b));
              });
              for (int64_t b = 0; b < nb; ++b)
                row_dots(N_out, D_out, w.uh(b), V.data() + lay.block(blk + b), w.c(b));
            }
            for (int64_t b = 0; b < nb; ++b) {
              coupling_from_logits(p, first, w.c(b));
              if (!first) scale_add(N_out, D_out, w.c(b), w.uh(b), part + lay.block(blk + b));
              if (last && c_out != nullptr)
                for (int64_t l = 0; l < lay.active(blk + b); ++l)
                  for (int64_t j = 0; j < N_out; ++j)
                    c_out[(((blk + b) * L + l) * N_in + i) * N_out + j] =
                        static_cast<scalar_t>(w.c(b)[j * L + l]);
            }
          }
        }
      }
    });
    // s = bias + sum over chunks (in chunk order); v = squash(s); V += v.
    if (bias != nullptr) {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t e = 0; e < J; ++e) s[lay.at(b, e)] = static_cast<acc_t>(bias[e]);
    } else {
      std::fill(s.begin(), s.end(), acc_t(0));
    }
    add_chunks(chunks.count, lay.size(), partial.data(), s.data());
    acc_t* s_t = s_all + (t - 1) * B * J;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < N_out; ++j) {
        acc_t n2 = 0;
        for (int64_t d = 0; d < D_out; ++d) {
          const acc_t x = s[lay.at(b, j * D_out + d)];
          s_t[b * J + j * D_out + d] = x;
          n2 += x * x;
        }
        const acc_t f = squash_scale(n2, eps);
        for (int64_t d = 0; d < D_out; ++d) {
          const int64_t o = lay.at(b, j * D_out + d);
          V[o] += f * s[o];
          if (last) v_out[b * J + j * D_out + d] = static_cast<scalar_t>(f * s[o]);
        }
      }
  }
}

// ---------------------------------------------------------------------------------------
// Backward (DESIGN.md section 1). gs[t] = dL/ds^(t) is found by a sweep t = r .. 1 that
// carries G = sum over later iterations of sum_i gbeta_ij u_hat_ij (one pass over the
// input capsules per iteration); a last pass, local per (b, i), forms g_uh and hands it to
// the source, which writes grad_u_hat or contracts it into grad_u and grad_weight.
template <typename scalar_t, typename acc_t, typename Source>
void routing_backward(const Problem& p, const Source& proto, bool detach, const scalar_t* grad_v,
                      const acc_t* grad_c, const acc_t* s_all, scalar_t* grad_bias) {
  constexpr int L = kLanes<acc_t>;
  const int64_t B = p.n.B, N_in = p.n.N_in, N_out = p.n.N_out, D_out = p.n.D_out, J = p.J;
  const int64_t r = p.iterations;
  const acc_t eps = static_cast<acc_t>(p.eps);
  const Chunks chunks(N_in);
  const Blocked<acc_t> lay(B, J);

  Buffer<acc_t> V_prev(r * lay.size());
  running_sums(p, lay, s_all, V_prev.data());
  Buffer<acc_t> gs(r * lay.size(), acc_t(0));
  Buffer<acc_t> G(lay.size(), acc_t(0));
  Buffer<acc_t> partial(chunks.count * lay.size());
  // With detach only the last iteration carries gradient, and c^(r) is a constant.
  const int64_t t_min = detach ? r : 1;
  // The sweep's c^(t) and gbeta^(t) (t >= 2, after the softmax and its backward), kept for the
  // last pass where they fit CAPSROUTE_COUPLING_CACHE_MB: it then makes no predictions and no
  // dot products, only g_uh from them. Kept or recomputed, they are the same bits. [t - 2][i]
  // [batch block][c, gbeta][N_out][L]; each (i, block) is written by one thread.
  const int64_t kept_step = 2 * N_out * L;
  const int64_t kept_elems = (r - 1) * N_in * lay.blocks * kept_step;
  const bool keep = !detach && r >= 2 &&
                    kept_elems * int64_t(sizeof(acc_t)) <= coupling_cache_bytes();
  // (Not zero-filled, as a Buffer would be: the sweep writes every entry before it is read.)
  const std::unique_ptr<acc_t[]> kept(keep ? new acc_t[kept_elems] : nullptr);
  auto kept_at = [&](int64_t t, int64_t i, int64_t blk) {
    return kept.get() + (((t - 2) * N_in + i) * lay.blocks + blk) * kept_step;
  };
  // V^(t-1) and gs^(t) of a batch block.
  auto V_at = [&](int64_t t, int64_t blk) {
    return V_prev.data() + (t - 1) * lay.size() + lay.block(blk);
  };
  auto gs_at = [&](int64_t t, int64_t blk) {
    return gs.data() + (t - 1) * lay.size() + lay.block(blk);
  };

  // grad_c[b, i, :] added to the gradient of c^(r) of one batch block.
  auto add_grad_c = [&](int64_t i, int64_t blk, acc_t* g) {
    for (int64_t l = 0; l < lay.active(blk); ++l)
      for (int64_t j = 0; j < N_out; ++j)
        g[j * L + l] += grad_c[((blk * L + l) * N_in + i) * N_out + j];
  };

  for (int64_t t = r; t >= t_min; --t) {
    // gs^(t) = J_squash(s^(t))^T ([t == r] grad_v + G)
    acc_t* gst = gs.data() + (t - 1) * lay.size();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < N_out; ++j) {
        const acc_t* s = s_all + ((t - 1) * B + b) * J + j * D_out;
        acc_t n2 = 0, sg = 0;
        for (int64_t d = 0; d < D_out; ++d) {
          // gv = [t == r] grad_v + G, formed in place in gs, then mapped through squash.
          const int64_t o = lay.at(b, j * D_out + d);
          const acc_t gv =
              G[o] + (t == r ? static_cast<acc_t>(grad_v[b * J + j * D_out + d]) : acc_t(0));
          gst[o] = gv;
          n2 += s[d] * s[d];
          sg += s[d] * gv;
        }
        acc_t a, bb;
        squash_vjp_coeffs(n2, sg, eps, &a, &bb);
        for (int64_t d = 0; d < D_out; ++d) {
          const int64_t o = lay.at(b, j * D_out + d);
          gst[o] = a * gst[o] + bb * s[d];
        }
      }
    if (t == t_min) break;  // no earlier iteration left that G would feed
    // G += sum_i gbeta^(t)_ij u_hat_ij, per chunk then in chunk order.
    for_each_chunk(chunks, [&](auto&& claim) {
      Source src = proto;
      Scratch<acc_t> w(p);
      for (int64_t ch = claim(); ch < chunks.count; ch = claim()) {
        acc_t* part = partial.data() + ch * lay.size();
        std::fill(part, part + lay.size(), acc_t(0));
        for (int64_t blk = 0; blk < lay.blocks; blk += kPair) {
          const int64_t nb = std::min(kPair, lay.blocks - blk);
          for (int64_t i = chunks.begin(ch); i < chunks.end(ch); ++i) {
            src.prepare(i);
            // c^(t) from the logits <u_hat, V^(t-1)>, and gc = <gs^(t), u_hat>.
            src.predict(blk, nb, [&](int64_t e0, int64_t b, const Rows<acc_t>& rows) {
              keep_rows(e0, rows, w.uh(b));
            });
            for (int64_t b = 0; b < nb; ++b) {
              row_dots(N_out, D_out, w.uh(b), V_at(t, blk + b), w.c(b));
              row_dots(N_out, D_out, w.uh(b), gs_at(t, blk + b), w.g(b));
              softmax_lanes(N_out, p.leaky, w.c(b));
              if (t == r && grad_c != nullptr) add_grad_c(i, blk + b, w.g(b));
              softmax_backward(N_out, w.c(b), w.g(b));
              scale_add(N_out, D_out, w.g(b), w.uh(b), part + lay.block(blk + b));
              if (keep) {
                acc_t* k = kept_at(t, i, blk + b);
                std::copy(w.c(b), w.c(b) + N_out * L, k);
                std::copy(w.g(b), w.g(b) + N_out * L, k + N_out * L);
              }
            }
          }
        }
      }
    });
    add_chunks(chunks.count, lay.size(), partial.data(), G.data());
  }

  if (grad_bias != nullptr) {
    for (int64_t e = 0; e < J; ++e) {
      acc_t acc = 0;
      for (int64_t t = t_min; t <= r; ++t)
        for (int64_t b = 0; b < B; ++b) acc += gs[(t - 1) * lay.size() + lay.at(b, e)];
      grad_bias[e] = static_cast<scalar_t>(acc);
    }
  }

  // g_uh_ij = sum_t c^(t)_ij gs^(t)_j + gbeta^(t)_ij V^(t-1)_j, local per (b, i). With the
  // sweep's couplings kept, from those; else one prediction serves every iteration: the
  // logits of each c^(t) (t >= 2) and, where c^(t) carries gradient, gc^(t) = <gs^(t), u_hat>.
  const int64_t t_dots = std::max<int64_t>(t_min, 2);
  for_each_chunk(chunks, [&](auto&& claim) {
    Source src = proto;
    Scratch<acc_t> w(p);
    for (int64_t ch = claim(); ch < chunks.count; ch = claim()) {
      for (int64_t i = chunks.begin(ch); i < chunks.end(ch); ++i) {
        src.prepare(i);
        src.begin_grad();
        for (int64_t blk = 0; blk < lay.blocks; blk += kPair) {
          const int64_t nb = std::min(kPair, lay.blocks - blk);
          if (!keep) {
            src.predict(blk, nb, [&](int64_t e0, int64_t b, const Rows<acc_t>& rows) {
              keep_rows(e0, rows, w.uh(b));
            });
            for (int64_t b = 0; b < nb; ++b)
              for (int64_t t = t_dots; t <= r; ++t) {
                row_dots(N_out, D_out, w.uh(b), V_at(t, blk + b), w.c(b, t));
                if (!detach) row_dots(N_out, D_out, w.uh(b), gs_at(t, blk + b), w.g(b, t));
              }
          }
          for (int64_t b = 0; b < nb; ++b) {
            acc_t* g_uh = src.grad_rows(blk + b);
            std::fill(g_uh, g_uh + J * L, acc_t(0));
            for (int64_t t = t_min; t <= r; ++t) {
              if (keep && t >= 2) {
                const acc_t* k = kept_at(t, i, blk + b);
                scale_add2(N_out, D_out, k, gs_at(t, blk + b), k + N_out * L, V_at(t, blk + b),
                           g_uh);
                continue;
              }
              coupling_from_logits(p, t == 1, w.c(b, t));
              // V^(0) = 0; with detach c^(r) is a constant
              if (t == 1 || detach) {
                scale_add(N_out, D_out, w.c(b, t), gs_at(t, blk + b), g_uh);
                continue;
              }
              if (t == r && grad_c != nullptr) add_grad_c(i, blk + b, w.g(b, t));
              softmax_backward(N_out, w.c(b, t), w.g(b, t));
              scale_add2(N_out, D_out, w.c(b, t), gs_at(t, blk + b), w.g(b, t),
                         V_at(t, blk + b), g_uh);
            }
            src.add_grad(blk + b);
          }
        }
        src.end_grad();
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Op entry points: validate, make contiguous, allocate, dispatch on dtype.

Problem make_problem(const RoutingSizes& n, int64_t iterations, bool leaky, double eps) {
  return Problem{n, n.N_out * n.D_out, iterations, leaky, eps};
}

template <typename scalar_t>
const scalar_t* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_routing_cpu(
    const at::Tensor& u_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
    int64_t iterations, bool leaky, bool detach, double eps, bool return_coupling) {
  const RoutingSizes n = check_dynamic_routing(u_in, weight_in, bias_in, iterations, eps);
  (void)detach;  // the forward values do not depend on it
  const auto u = u_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto bias = contiguous(bias_in);
  auto [v, c, s] = forward_outputs(u, n, iterations, return_coupling);
  if (n.B == 0) return {v, c, s};
  const Problem p = make_problem(n, iterations, leaky, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "dynamic_routing_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const WeightOperands<scalar_t, acc_t> ops(u.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                              n.B, n.N_in, p.J, n.D_in);
    WeightPredictions<scalar_t, acc_t> src{ops.u_blocked.data(), ops.w, nullptr, nullptr,
                                           n.B, n.N_in, p.J, n.D_in};
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
  const auto bias = contiguous(bias_in);
  auto [v, c, s] = forward_outputs(u_hat, n, iterations, return_coupling);
  if (n.B == 0) return {v, c, s};
  const Problem p = make_problem(n, iterations, leaky, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_hat.scalar_type(), "route_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GivenPredictions<scalar_t, acc_t> src{u_hat.data_ptr<scalar_t>(), nullptr, n.B, n.N_in, p.J};
    routing_forward<scalar_t, acc_t>(p, src, data_or_null<scalar_t>(bias), v.data_ptr<scalar_t>(),
                                     return_coupling ? c.data_ptr<scalar_t>() : nullptr,
                                     s.data_ptr<acc_t>());
  });
  return {v, c, s};
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
                                  iterations, u_in);
  const auto u = u_in.contiguous();
  const auto weight = weight_in.contiguous();
  auto grad_u = at::empty_like(u);
  auto grad_weight = at::empty_like(weight);
  auto grad_bias = zero_grad_bias(n, has_bias, u.options());
  if (n.B == 0) return {grad_u, grad_weight.zero_(), grad_bias};
  const Problem p = make_problem(n, iterations, leaky, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "dynamic_routing_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const WeightOperands<scalar_t, acc_t> ops(u.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                              n.B, n.N_in, p.J, n.D_in);
    WeightPredictions<scalar_t, acc_t> src{ops.u_blocked.data(), ops.w,
                                           grad_u.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(),
                                           n.B, n.N_in, p.J, n.D_in};
    routing_backward<scalar_t, acc_t>(p, src, detach, in.grad_v.data_ptr<scalar_t>(),
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
                                  u_hat_in);
  const auto u_hat = u_hat_in.contiguous();
  auto grad_u_hat = at::empty_like(u_hat);
  auto grad_bias = zero_grad_bias(n, has_bias, u_hat.options());
  if (n.B == 0) return {grad_u_hat, grad_bias};
  const Problem p = make_problem(n, iterations, leaky, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_hat.scalar_type(), "route_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GivenPredictions<scalar_t, acc_t> src{u_hat.data_ptr<scalar_t>(), grad_u_hat.data_ptr<scalar_t>(),
                                          n.B, n.N_in, p.J};
    routing_backward<scalar_t, acc_t>(p, src, detach, in.grad_v.data_ptr<scalar_t>(),
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
