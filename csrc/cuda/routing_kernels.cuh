// CUDA kernels of the capsroute ops. Device code only: no torch header, so this reads (and
// compiles) as plain CUDA; routing_launch.cuh holds the launch sequences. With
// -DCAPSROUTE_EMULATE the same code compiles for the CPU emulation (csrc/emu/cuda_emu.h)
// that tests it without a GPU.
//
// Work decomposition (shared/PERFORMANCE.md). A block's warps each own a tile of 8 batch
// elements and walk a chunk of input capsules i together, one capsule at a time, with the
// capsule's W[i] (the group's rows) staged in shared memory. Per (i, tile) a warp makes the
// predictions u_hat[b, i, j, :] one 16 x 8 tile at a time on the matrix units (m16n8k8 TF32,
// see predict_tile), in the layout of the product's accumulator: row tile = 16 output dims
// of one capsule, column = batch element, lane (g = lane / 4, t = lane % 4) holding dims
// {g, g + 8} of batch elements {2t, 2t + 1}. A tile is used where it is made (agreement with
// V or gs, or the weighted sum) and dropped, so nothing of size B x N_in x N_out x D_out is
// ever held, let alone written. The softmax over j is local to the 8 lanes that share t,
// which hold each (b, j)'s logit once between them ("spread", see reduce_scatter) after the
// sums over dims. A warp sums up to 16 row tiles (16 capsules of <= 16 dims, or 8 of <= 32):
// a group; more capsules are split into groups run by separate blocks, with the softmax
// statistics over all of them made once per iteration by a statistics pass per group, merged
// (Pass::kStats, merge_group_stats_kernel); with them given, a group's pass uses each
// prediction tile for its agreement and its sum (group_walk). The forward's and the gradient
// passes of the usual layer sizes run on row_pass_kernel instead, 16 batch elements per
// product; the first iteration's sums, which need no agreements, are one matrix product
// (first_sums_kernel) where D_in is a multiple of 8.
//
// Sums over input capsules are formed per warp in registers, written per block, and added
// across blocks by a separate kernel in block order: no float atomics, so results are
// bit-identical from run to run.
#pragma once

#ifdef CAPSROUTE_EMULATE
#include "../emu/cuda_emu.h"  // the same code compiled for the CPU, to test it without a GPU
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../routing_math.h"

namespace capsroute {
namespace cuda {

constexpr int kTileB = 8;      // batch elements per warp tile
constexpr int kTileD = 16;     // output dims per row tile
constexpr int kGroupRows = 16; // row tiles of a group: a warp sums them in registers
constexpr int kWarps = 8;      // warps per block
constexpr int kThreads = kWarps * 32;
// Pass blocks resident per multiprocessor. The passes are latency-bound (Nsight Compute: one
// 8-warp block per SM left 2 warps per scheduler, issue slots 28% busy); two blocks give the
// schedulers twice the warps to switch between, at the price of a 128-register budget.
constexpr int kPassBlocksPerSM = 2;

// --- scalar types ----------------------------------------------------------------------

template <typename T>
struct Scalar {  // float
  using acc = float;
  static __device__ __forceinline__ float load(const T* p) { return *p; }
  static __device__ __forceinline__ T store(float x) { return x; }
};
template <>
struct Scalar<double> {
  using acc = double;
  static __device__ __forceinline__ double load(const double* p) { return *p; }
  static __device__ __forceinline__ double store(double x) { return x; }
};
template <>
struct Scalar<__half> {
  using acc = float;
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Scalar<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) {
    return __bfloat162float(*p);
  }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) {
    return __float2bfloat16_rn(x);
  }
};

// The blocks per multiprocessor a kernel of kThreads threads asks registers for
// (__launch_bounds__): `want` where it accumulates in float, one in float64 (whose values take
// two registers each: at 128 registers the float64 kernels spill heavily).
template <typename scalar_t>
constexpr int blocks_per_sm(int want) {
  return std::is_same<typename Scalar<scalar_t>::acc, float>::value ? want : 1;
}

#ifdef CAPSROUTE_EMULATE
using emu::ex2_approx_ftz;
#else
__device__ __forceinline__ float ex2_approx_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

// exp of the softmax. float: 2^(x log2 e) on the special-function unit, two instructions
// where expf takes eight (with 24 or more per lane and input capsule they were a quarter of
// the forward pass). Its error: the rounding of x log2 e, |x| 2^-24 relative, large only where
// x = logit - max is very negative and exp(x) negligible beside the largest term (which has
// x = 0), and the unit's ~2 ulp: ~1e-7 of the coupling coefficients, against float32's 1e-5.
template <typename T>
__device__ __forceinline__ T exp_(T x) {
  return exp(x);
}
template <>
__device__ __forceinline__ float exp_(float x) {
  return ex2_approx_ftz(x * 1.44269504088896341f);
}

// The kernel's dynamic shared memory (the size is set at launch).
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef CAPSROUTE_EMULATE
  return reinterpret_cast<T*>(emu::shared_memory());
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<T*>(smem_raw);
#endif
}

// --- problem description --------------------------------------------------------------

struct Dims {
  int64_t B, N_in, N_out, D_in, D_out;
  int64_t J;         // N_out * D_out
  int n_groups;      // groups of output capsules (blocks along grid.z)
  int caps_per_group;
  // A pass: a block of `warps` warps (one batch tile each) walks `i_per_block` input
  // capsules; `n_chunks` blocks along N_in.
  int warps, i_per_block, n_chunks;
  // The partial sums [partials, B, N_out * D_out] that a pass writes: one per block along
  // N_in, or with the row passes in thread-block clusters of `cluster` blocks (0 or 1: none),
  // which add up their sums on chip, one per cluster.
  int partials, cluster;
  int k_chunks;        // ceil(D_in / 8): chunks of 8 input dims, one matrix product each
  bool leaky;
  bool rows8;          // D_in % 8 == 0 and W 16-byte aligned: W[i] copies in 16-byte pieces
  bool w_shared;       // a kernel stages W[i] (its group's rows) in shared memory
  bool tiles_shared;   // a pass keeps V (and gs) of its batch tiles in shared memory
};

// Capsules of the widest group of output capsules, and their columns (capsule dims): a
// group's rows of W[i] are that many times D_in elements.
__host__ __device__ __forceinline__ int64_t widest_group_caps(const Dims& n) {
  return n.N_out < n.caps_per_group ? n.N_out : n.caps_per_group;
}
__host__ __device__ __forceinline__ int64_t widest_group_cols(const Dims& n) {
  return widest_group_caps(n) * n.D_out;
}

// Where row (b, i) of the couplings c [B, N_in, N_out] (and of grad_c) starts: c[b, i, j] is
// at coupling_row(n, b, i) + j, and route's prediction u_hat[b, i, j] at that times D_out.
// (j is left to the caller, in the type its loop has: a 64-bit j where the group pass had a
// 32-bit one cost it 42 instructions per capsule, SASS, float.)
__host__ __device__ __forceinline__ int64_t coupling_row(const Dims& n, int64_t b, int64_t i) {
  return (b * n.N_in + i) * n.N_out;
}

// --- the tiled layout of V, V_prev and gs ------------------------------------------------
//
// The kernels' own [B, N_out, D_out] arrays in the accumulation type (the running sums V and
// V_prev, the gradients gs) are stored as the lanes hold them: [ceil(B / 8) batch tiles]
// [N_out][DT row tiles][32 lanes][4 slots], one row tile (8 batch elements, 16 dims of one
// capsule) in the fragment layout of the matrix products (see Lane: slot q of lane (g, t) is
// dim dt * 16 + g + 8 (q >> 1) of batch element 2t + (q & 1)), with zeros past B and D_out.
// A lane's four values of a row tile are then one 16-byte load (two in float64) with no
// bounds tests, where [b, j, d] order took four 4-byte loads from four rows, each with its
// own address and tests. DT = row_tiles(n), the kernels' DT.
constexpr int kTileElems = kTileB * kTileD;  // a row tile: 32 lanes x 4 slots
__host__ __device__ __forceinline__ int row_tiles(const Dims& n) {
  return n.D_out > kTileD ? 2 : 1;
}
__host__ __device__ inline int64_t tiled_elems(const Dims& n) {
  return (n.B + kTileB - 1) / kTileB * n.N_out * row_tiles(n) * kTileElems;
}
__host__ __device__ inline int64_t tiled_offset(const Dims& n, int64_t b, int64_t j, int d) {
  const int dd = d % kTileD, lane = (dd % 8) * 4 + static_cast<int>(b % kTileB) / 2;
  const int q = (dd / 8) * 2 + static_cast<int>(b % 2);
  return (((b / kTileB) * n.N_out + j) * row_tiles(n) + d / kTileD) * kTileElems + lane * 4 + q;
}

// Per-iteration state, all [B, N_out, D_out] in the accumulation type unless noted.
template <typename acc_t>
struct State {
  const acc_t* V;        // v^(1) + ... + v^(t-1): logits are <u_hat, V>
  const acc_t* gs;       // dL/ds^(t)                       (backward)
  const acc_t* grad_c;   // dL/dc^(r) [B, N_in, N_out] or null (backward, t == r only)
  bool first;            // t == 1: V = 0, coupling is uniform
  // V and gs are tiled (see tiled_offset) from batch element b_base and output capsule j_base
  // on, `caps` capsules per batch tile: all of them in global memory (b_base 0, caps N_out,
  // j_base 0) or a block's shared-memory tiles of its batch tiles and its group's capsules.
  int64_t b_base = 0, caps = 0, j_base = 0;
  // Several groups of output capsules only (else null): the softmax statistics over ALL
  // capsules, [B, N_in, 2] (max, sum of exp), and the softmax backward's sum_k c_k g_k,
  // [B, N_in], made once per iteration by launch_group_stats instead of by every group.
  const acc_t* stats = nullptr;
  const acc_t* cg = nullptr;
  // Gradient pass only (else null): where it keeps c^(t) and the logit gradient for the last
  // pass, [2, kept_plane] (see keep_couplings).
  acc_t* kept = nullptr;
};

// Which lane holds what: fragment slot q = 2 * (dim half) + (batch half).
struct Lane {
  int g, t;
  __device__ Lane() : g((threadIdx.x & 31) >> 2), t(threadIdx.x & 3) {}
  __device__ __forceinline__ int dim(int dt, int q) const { return dt * kTileD + g + ((q >> 1) << 3); }
  __device__ __forceinline__ int col(int q) const { return 2 * t + (q & 1); }
  // Where its four slots of a row tile start in a tiled array (see tiled_offset).
  __device__ __forceinline__ int slots() const { return (g * 4 + t) * 4; }
};

// Whether output capsule j exists, in 32 bits (N_out < 2^31: make_dims limits the groups;
// the tests run in the kernels' inner loops).
__device__ __forceinline__ bool has_capsule(const Dims& n, int j) {
  return j < static_cast<int>(n.N_out);
}

// c^(1): the coupling coefficients of the first iteration, whose logits are all 0 (with leaky
// routing an extra logit 0 joins the softmax).
template <typename acc_t>
__host__ __device__ __forceinline__ acc_t uniform_coupling(const Dims& n) {
  return acc_t(1) / acc_t(n.N_out + (n.leaky ? 1 : 0));
}

// Where a lane's fragments of a batch tile start in a tiled array (V or gs, in global memory
// or a block's shared-memory tiles, as State says), found once per batch tile: a fragment load
// is then one 32-bit offset from it, where the full index (64-bit, with b) was rebuilt for
// every element, ~15 instructions each (ncu: three quarters of the last backward pass's
// instructions).
template <typename acc_t>
struct LaneRows {
  const acc_t* p;  // capsule j_base's first row tile, at the lane's slots
  int j_base;
};
// A pointer the compiler cannot see through: without it, it folds each 32-bit offset back into
// one 64-bit index from the kernel argument (5 instructions a load, seen in the SASS) rather
// than keep the row pointers in registers.
template <typename T>
__device__ __forceinline__ const T* opaque(const T* p) {
#ifndef CAPSROUTE_EMULATE
  asm("mov.b64 %0, %0;" : "+l"(p));
#endif
  return p;
}

// The same for a 32-bit offset walked in an unrolled loop, which the compiler would otherwise
// rebuild in closed form at every use.
__device__ __forceinline__ int opaque(int x) {
#ifndef CAPSROUTE_EMULATE
  asm("mov.b32 %0, %0;" : "+r"(x));
#endif
  return x;
}

template <int DT, typename acc_t>
__device__ __forceinline__ LaneRows<acc_t> lane_rows(const acc_t* a, const State<acc_t>& st,
                                                     const Dims&, const Lane& L, int64_t b0) {
  const int64_t tile = (b0 - st.b_base) / kTileB;
  return {opaque(a + tile * st.caps * DT * kTileElems + L.slots()),
          static_cast<int>(st.j_base)};
}

// The lane's four values of row tile (j, dt) of the batch tile (slot q: batch half q & 1, dim
// dt * 16 + g + 8 (q >> 1)); zeros for a capsule past N_out. Offsets are 32-bit (a batch
// tile of N_out capsules: N_out * 16 * DT * 8 < 2^31, make_dims).
__device__ __forceinline__ void load4(const float* p, float (&f)[4]) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  f[0] = x.x, f[1] = x.y, f[2] = x.z, f[3] = x.w;
}
__device__ __forceinline__ void load4(const double* p, double (&f)[4]) {
  const double2* v = reinterpret_cast<const double2*>(p);
  const double2 x = v[0], y = v[1];
  f[0] = x.x, f[1] = x.y, f[2] = y.x, f[3] = y.y;
}
__device__ __forceinline__ void store4(float* p, const float (&f)[4]) {
  *reinterpret_cast<float4*>(p) = float4{f[0], f[1], f[2], f[3]};
}
template <int DT, typename acc_t>
__device__ __forceinline__ void load_frag(const LaneRows<acc_t>& x, const Dims& n, int j, int dt,
                                          acc_t (&f)[4]) {
  if (!has_capsule(n, j)) {  // warp-uniform
#pragma unroll
    for (int q = 0; q < 4; ++q) f[q] = acc_t(0);
    return;
  }
  load4(x.p + ((j - x.j_base) * DT + dt) * kTileElems, f);
}

// --- prediction sources ---------------------------------------------------------------

// dynamic_routing: u_hat[b, i, j] = W[i, j] u[b, i], recomputed in registers.
template <typename scalar_t>
struct WeightSource {
  static constexpr bool kComputed = true;
  static constexpr bool kFragments = false;
  static constexpr int kChunks = 0;  // (see FragmentSource)
  const scalar_t* __restrict__ u;  // [B, N_in, D_in]
  const scalar_t* __restrict__ W;  // [N_in, N_out, D_out, D_in]
  // W[i] of the capsule at hand, from output capsule wi_j0 on: all of it in global memory
  // (wi_j0 = 0), or a shared-memory copy of one group's rows.
  const scalar_t* Wi = nullptr;
  int64_t wi_j0 = 0;
};

// dynamic_routing with W[i] staged in shared memory as the matrix units' operands (float,
// half, bfloat16; see build_fragments), for kernels where they fit there. kChunks > 0: the
// number of chunks of 8 input dims, k_chunks, known at compile time (1: D_in <= 8, the usual
// capsule), so that a prediction tile is straight-line code that the compiler can interleave
// with the next tiles' (the matrix units' latency hidden by independent work, not by other
// warps: a pass runs 8 warps per SM); 0: any D_in, a loop over the chunks.
template <typename scalar_t, int kChunks_ = 0>
struct FragmentSource {
  static constexpr int kChunks = kChunks_;
  static constexpr bool kComputed = true;
  static constexpr bool kFragments = true;
  // TF32 parts per operand: float32 values are split into hi + lo; half types are exact.
  static constexpr int kParts = std::is_same<scalar_t, float>::value ? 2 : 1;
  const scalar_t* __restrict__ u;  // [B, N_in, D_in]
  const scalar_t* __restrict__ W;  // [N_in, N_out, D_out, D_in]
  // Shared memory: the group's rows of W[i] as A operands, [16 row tiles][k_chunks][kParts]
  // [32 lanes], and the warp's u[b, i] as B operands (hi pair, lo pair), [k_chunks][32 lanes].
  uint4* Wf = nullptr;
  uint4* Uf = nullptr;
  // Elements of Wf between the operands of consecutive groups (0: one group's are staged).
  int group_stride = 0;
};

// route: u_hat given by the caller.
template <typename scalar_t>
struct GivenSource {
  static constexpr bool kComputed = false;
  static constexpr bool kFragments = false;
  static constexpr int kChunks = 0;  // (see FragmentSource)
  const scalar_t* __restrict__ u_hat;  // [B, N_in, N_out, D_out]
};

// --- matrix units: m16n8k8 products in TF32 ------------------------------------------
//
// mma.m16n8k8 (tf32 inputs, float32 accumulation) on the fragment layout above: with
// g = lane / 4 and t = lane % 4, A (16 x 8, row-major) is a[0] = A[g][t], a[1] = A[g + 8][t],
// a[2] = A[g][t + 4], a[3] = A[g + 8][t + 4]; B (8 x 8) is b[0] = B[t][g], b[1] = B[t + 4][g];
// the accumulator is exactly a row tile's uh[r][q] (rows g, g + 8; columns 2t, 2t + 1).
// A prediction tile is one such product per 8 input dims: A = 16 rows of W[i, j] (output dims
// by input dims), B = u[b, i, :] of the warp's 8 batch elements.
//
// TF32 keeps 10 of float32's 23 mantissa bits, so float32 operands are split as x = hi + lo
// (both TF32) and the product formed as hi*hi + hi*lo + lo*hi ("3xTF32"; the dropped lo*lo
// is ~2^-22 relative): float32 accuracy from the matrix units. float16 and bfloat16 values
// are exact in TF32 (at most 11 significant bits, exponent range within float32's), so
// their predictions take one product and are exact up to float32 accumulation.

#ifdef CAPSROUTE_EMULATE
using emu::mma_tf32;
#else
// d += A B for one 16 x 8 x 8 tile (layout above). Not volatile: the product has no side
// effects, and the compiler may move it among other work. TF32 products need compute
// capability 8.0, as cp.async below does: a build that includes older architectures compiles
// a trap for them, and the op refuses their GPUs before it launches anything (check_device).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
#if __CUDA_ARCH__ >= 800
  asm(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}
#endif

// x = hi + lo as operands of the matrix units, which read a .tf32 operand's sign, exponent and
// top 10 mantissa bits and ignore the low 13 (truncation). hi is x rounded to the nearest
// TF32 value by adding half a TF32 unit to the bit pattern and clearing the low bits: two
// integer instructions, where cvt.rna.tf32.f32 costs five on sm_90 (no native instruction).
// lo = x - hi is exact in float32 and handed over as it is: the hardware's truncation of it
// errs by at most 2^-10 of lo, i.e. 2^-21 of x, the size of the lo*lo term that 3xTF32 drops.
// Non-finite x: inf stays inf; a NaN may lose its payload in hi, but lo = x - hi is NaN, so
// the products stay NaN. kExact (half types, exact in TF32): hi = x, lo unused.
template <bool kExact>
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  memcpy(&hi, &x, sizeof hi);
  if (!kExact) {
    hi = (hi + 0x1000u) & 0xffffe000u;
    float h;
    memcpy(&h, &hi, sizeof h);
    const float rest = x - h;
    memcpy(&lo, &rest, sizeof lo);
  }
}

// uh[r] += A B with A, B given as TF32 pairs (hi, lo); lo parts unused when kExact.
template <bool kExact>
__device__ __forceinline__ void mma_split(float (&d)[4], const uint32_t (&a_hi)[4],
                                          const uint32_t (&a_lo)[4], const uint32_t (&b_hi)[2],
                                          const uint32_t (&b_lo)[2]) {
  if (!kExact) {  // small terms first
    mma_tf32(d, a_lo, b_hi);
    mma_tf32(d, a_hi, b_lo);
  }
  mma_tf32(d, a_hi, b_hi);
}

// d += A B as mma_split, the product made from zero and added with FADDs. The matrix units
// round their float32 sums toward zero, so a sum that runs on in their accumulators drifts
// towards zero by up to an ulp per instruction: over many chunks of input dims (D_in = 512:
// grad_u and grad_W off by 1e-4 in float32, emulated) or capsules and batch tiles (make_tiles,
// add_weight_grad). A product's own truncation is relative to it and does not accumulate.
template <bool kExact>
__device__ __forceinline__ void mma_split_add(float (&d)[4], const uint32_t (&a_hi)[4],
                                              const uint32_t (&a_lo)[4],
                                              const uint32_t (&b_hi)[2],
                                              const uint32_t (&b_lo)[2]) {
  float x[4] = {0.f, 0.f, 0.f, 0.f};
  mma_split<kExact>(x, a_hi, a_lo, b_hi, b_lo);
#pragma unroll
  for (int q = 0; q < 4; ++q) d[q] += x[q];
}

// --- predictions, one row tile at a time -------------------------------------------
//
// The kernels never hold all of a group's predictions: each use (the agreements with V or
// gs, the weighted sums) makes the row tile it needs, uses it and drops it, so that only
// 4 values per lane are live at a time. Making a tile again is cheap (a few matrix
// instructions on W[i] in shared memory, or L1 hits on u_hat for route).

// Row tile r of group `grp` for input capsule i and the warp's batch tile: capsule
// grp * GJ + r / DT, dims (r % DT) * 16 + {g, g + 8}, batch elements b0 + {2t, 2t + 1}
// (fragment slot q as in Lane). The capsule must exist (callers test j < N_out).
// Matrix units (float32 accumulation: float, half, bfloat16 inputs).
template <int DT, typename scalar_t>
__device__ __forceinline__ void predict_tile(const WeightSource<scalar_t>& src, const Dims& n,
                                             const Lane& L, int64_t i, int64_t b0, int grp,
                                             int r, float (&uh)[4]) {
  using S = Scalar<scalar_t>;
  constexpr bool kExact = !std::is_same<scalar_t, float>::value;
  constexpr int GJ = kGroupRows / DT;
  // Offsets within one capsule's rows in 32 bits (D_out * D_in < 2^31: make_dims).
  const int D_in = static_cast<int>(n.D_in), D_out = static_cast<int>(n.D_out);
  const int64_t j = int64_t(grp) * GJ + r / DT;
  const int d0 = (r % DT) * kTileD + L.g, d1 = d0 + 8;  // A's rows of this lane
  const scalar_t* w = src.Wi + (j - src.wi_j0) * (D_out * D_in);
  const int64_t b = b0 + L.g;                          // B's column of this lane
  const bool b_in = b < n.B;
  const scalar_t* u_row = src.u + ((b_in ? b : 0) * n.N_in + i) * D_in;
#pragma unroll
  for (int q = 0; q < 4; ++q) uh[q] = 0.f;
  for (int k0 = 0; k0 < D_in; k0 += 8) {
    const int ka = k0 + L.t, kb = ka + 4;  // B's rows (and A's columns) of this lane
    uint32_t bh[2], bl[2] = {0, 0};
    split_tf32<kExact>(b_in && ka < D_in ? S::load(u_row + ka) : 0.f, bh[0], bl[0]);
    split_tf32<kExact>(b_in && kb < D_in ? S::load(u_row + kb) : 0.f, bh[1], bl[1]);
    auto at = [&](int d, int k) {
      return d < D_out && k < D_in ? S::load(w + (d * D_in + k)) : 0.f;
    };
    uint32_t ah[4], al[4] = {0, 0, 0, 0};
    split_tf32<kExact>(at(d0, ka), ah[0], al[0]);
    split_tf32<kExact>(at(d1, ka), ah[1], al[1]);
    split_tf32<kExact>(at(d0, kb), ah[2], al[2]);
    split_tf32<kExact>(at(d1, kb), ah[3], al[3]);
    mma_split_add<kExact>(uh, ah, al, bh, bl);
  }
}

// The same from operands staged in shared memory (FragmentSource), any number of chunks of 8
// input dims (predict_tiles makes the tiles itself where the count is compiled in): per chunk
// one 16-byte load per operand part and the products; no bounds tests (the staged operands
// are zero past D_out and D_in), no index arithmetic beyond a stride, no conversion.
template <int DT, typename scalar_t, int kChunks>
__device__ __forceinline__ void predict_tile(const FragmentSource<scalar_t, kChunks>& src,
                                             const Dims& n, const Lane&, int64_t, int64_t,
                                             int grp, int r, float (&uh)[4]) {
  constexpr bool kExact = !std::is_same<scalar_t, float>::value;
  constexpr int P = FragmentSource<scalar_t>::kParts;
  const int lane = threadIdx.x & 31;
  const uint4* a = src.Wf + grp * src.group_stride + r * n.k_chunks * P * 32 + lane;
  const uint4* b = src.Uf + lane;
#pragma unroll
  for (int q = 0; q < 4; ++q) uh[q] = 0.f;
#pragma unroll 1
  for (int c = 0; c < n.k_chunks; ++c, a += P * 32, b += 32) {
    const uint4 ah = a[0], bu = b[0];
    const uint32_t a_hi[4] = {ah.x, ah.y, ah.z, ah.w}, b_hi[2] = {bu.x, bu.y},
                   b_lo[2] = {bu.z, bu.w};
    uint32_t a_lo[4] = {0, 0, 0, 0};
    if (!kExact) {
      const uint4 al = a[32];
      a_lo[0] = al.x, a_lo[1] = al.y, a_lo[2] = al.z, a_lo[3] = al.w;
    }
    mma_split_add<kExact>(uh, a_hi, a_lo, b_hi, b_lo);
  }
}

// float64: FMAs (the matrix units' float64 products are not worth the bookkeeping here).
template <int DT>
__device__ __forceinline__ void predict_tile(const WeightSource<double>& src, const Dims& n,
                                             const Lane& L, int64_t i, int64_t b0, int grp,
                                             int r, double (&uh)[4]) {
  constexpr int GJ = kGroupRows / DT;
  const int64_t j = int64_t(grp) * GJ + r / DT;
  const int64_t bA = b0 + 2 * L.t, bB = bA + 1;
#pragma unroll
  for (int q = 0; q < 4; ++q) uh[q] = 0.0;
  for (int64_t k0 = 0; k0 < n.D_in; k0 += 8) {
    double ua[8], ub[8];
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const int64_t k = k0 + kk;
      ua[kk] = (k < n.D_in && bA < n.B) ? src.u[(bA * n.N_in + i) * n.D_in + k] : 0.0;
      ub[kk] = (k < n.D_in && bB < n.B) ? src.u[(bB * n.N_in + i) * n.D_in + k] : 0.0;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // dims g and g + 8
      const int d = L.dim(r % DT, 2 * h);
      if (d >= n.D_out) continue;
      const double* wp = src.Wi + ((j - src.wi_j0) * n.D_out + d) * n.D_in + k0;
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const double w = k0 + kk < n.D_in ? wp[kk] : 0.0;
        uh[2 * h] += w * ua[kk];
        uh[2 * h + 1] += w * ub[kk];
      }
    }
  }
}

// route: the tile read from the given predictions (L1 hits after the first use).
template <int DT, typename scalar_t, typename acc_t>
__device__ __forceinline__ void predict_tile(const GivenSource<scalar_t>& src, const Dims& n,
                                             const Lane& L, int64_t i, int64_t b0, int grp,
                                             int r, acc_t (&uh)[4]) {
  constexpr int GJ = kGroupRows / DT;
  const int64_t j = int64_t(grp) * GJ + r / DT;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t b = b0 + L.col(q);
    const int d = L.dim(r % DT, q);
    uh[q] = (b < n.B && d < n.D_out)
                ? Scalar<scalar_t>::load(src.u_hat + (coupling_row(n, b, i) + j) * n.D_out + d)
                : acc_t(0);
  }
}

// Capsules of a group whose prediction tiles are made together, as independent chains of
// matrix and shuffle instructions that the compiler interleaves (a pass has 8 warps per SM:
// too few to hide those latencies by switching warps). Staged operands (FragmentSource) are
// zeros past the group's capsules, so a batch may run past N_out (results dropped); other
// sources read memory that exists only up to N_out, so they go one tested capsule at a time.
template <typename Src, int GJ>
constexpr int capsule_batch() {
  return !Src::kFragments ? 1 : GJ < 4 ? GJ : 4;
}

// Row tiles r0 .. r0 + N - 1 of predict_tile, made together, into uh[m0 .. m0 + N - 1]: as
// they are (kAdd false) or added to what uh holds (kAdd). From staged operands with the chunk
// count compiled in, the matrix instructions go stage by stage across the tiles, so that each
// is independent of the one before it (the matrix units' latency overlaps).
// The products start from zero and kAdd adds the finished tiles with FADDs (see
// mma_split_add): the t = 1 pass once kept its sums in the accumulators, three instructions a
// capsule, and over the hundreds of capsules of a block at large batch sizes (plan_chunks)
// that bias reached 1e-5 of v on the H100.
template <int DT, bool kAdd, int N, typename Src, typename acc_t, int M>
__device__ __forceinline__ void make_tiles(const Src& src, const Dims& n, const Lane& L,
                                           int64_t i, int64_t b0, int grp, int r0,
                                           acc_t (&uh)[M][4], int m0) {
  static_assert(N <= M, "the tiles fit the array");
  if constexpr (Src::kFragments && Src::kChunks > 0) {
    constexpr bool kExact = Src::kParts == 1;
    constexpr int P = Src::kParts, KC = Src::kChunks;
    const int lane = threadIdx.x & 31;
    const uint4* a = src.Wf + grp * src.group_stride + r0 * KC * P * 32 + lane;
    float x[N][4];
#pragma unroll
    for (int m = 0; m < N; ++m)
#pragma unroll
      for (int q = 0; q < 4; ++q) x[m][q] = 0.f;
#pragma unroll
    for (int c = 0; c < KC; ++c) {
      const uint4 bu = src.Uf[c * 32 + lane];
      const uint32_t b_hi[2] = {bu.x, bu.y}, b_lo[2] = {bu.z, bu.w};
      uint32_t a_hi[N][4], a_lo[N][4];
#pragma unroll
      for (int m = 0; m < N; ++m) {
        const uint4 ah = a[(m * KC + c) * P * 32];
        a_hi[m][0] = ah.x, a_hi[m][1] = ah.y, a_hi[m][2] = ah.z, a_hi[m][3] = ah.w;
        if (!kExact) {
          const uint4 al = a[(m * KC + c) * P * 32 + 32];
          a_lo[m][0] = al.x, a_lo[m][1] = al.y, a_lo[m][2] = al.z, a_lo[m][3] = al.w;
        }
      }
      if (!kExact) {  // small terms first, as in mma_split
#pragma unroll
        for (int m = 0; m < N; ++m) mma_tf32(x[m], a_lo[m], b_hi);
#pragma unroll
        for (int m = 0; m < N; ++m) mma_tf32(x[m], a_hi[m], b_lo);
      }
#pragma unroll
      for (int m = 0; m < N; ++m) mma_tf32(x[m], a_hi[m], b_hi);
    }
#pragma unroll
    for (int m = 0; m < N; ++m)
#pragma unroll
      for (int q = 0; q < 4; ++q) uh[m0 + m][q] = kAdd ? uh[m0 + m][q] + x[m][q] : x[m][q];
  } else {
#pragma unroll
    for (int m = 0; m < N; ++m) {
      if constexpr (kAdd) {
        acc_t x[4];
        predict_tile<DT>(src, n, L, i, b0, grp, r0 + m, x);
#pragma unroll
        for (int q = 0; q < 4; ++q) uh[m0 + m][q] += x[q];
      } else {
        predict_tile<DT>(src, n, L, i, b0, grp, r0 + m, uh[m0 + m]);
      }
    }
  }
}
// uh = row tiles r0 .. r0 + N - 1.
template <int DT, int N, typename Src, typename acc_t>
__device__ __forceinline__ void predict_tiles(const Src& src, const Dims& n, const Lane& L,
                                              int64_t i, int64_t b0, int grp, int r0,
                                              acc_t (&uh)[N][4]) {
  make_tiles<DT, false, N>(src, n, L, i, b0, grp, r0, uh, 0);
}
// sum[r] += row tile r for r = r0 .. r0 + N - 1 (sum: all kGroupRows row tiles of a group).
template <int DT, int N, typename Src, typename acc_t>
__device__ __forceinline__ void add_tiles(const Src& src, const Dims& n, const Lane& L,
                                          int64_t i, int64_t b0, int grp, int r0,
                                          acc_t (&sum)[kGroupRows][4]) {
  make_tiles<DT, true, N>(src, n, L, i, b0, grp, r0, sum, r0);
}

// --- per-(b, j) values, spread over the lanes ------------------------------------------
//
// A group's per-(b, j) values (logits, couplings, their gradients) are spread over the 8 lanes
// that share t, none held twice: the capsules go in batches of four (jl = 4 nb + s), and in
// batch nb lane g holds capsule s = g / 2 for batch element h = g % 2 (b = b0 + 2t + h), one
// value per batch: acc_t x[kBatches<DT>]. A dot product over a capsule's dims ends as partial
// sums in those 8 lanes; reduce_scatter leaves each whole sum in the one lane that holds it
// (14 shuffles for 4 capsules' logits and gradients, where an all-reduce that left all 16 sums
// in every lane took 48), and the softmax then takes one exp per value, not 8 copies of it.
// The arrays are an eighth of the all-lanes ones (c and g took 64 registers of the
// gradient pass's 128, and it spilled 388 bytes). Where a row tile needs its capsule's value
// for both batch halves (the accumulator layout), spread_at fetches them: two shuffles per
// capsule.
template <int DT>
constexpr int kBatches = kGroupRows / DT / 4;

// The group's capsule (jl) and the batch element (b) of the lane's value of batch nb.
__device__ __forceinline__ int spread_capsule(const Lane& L, int nb) { return 4 * nb + (L.g >> 1); }
__device__ __forceinline__ int64_t spread_batch(const Lane& L, int64_t b0) {
  return b0 + 2 * L.t + (L.g & 1);
}

// One stage of reduce_scatter: lanes `o` apart swap halves of x[0 .. 2N); each keeps the half
// its lane bit names (upper: x[N .. 2N)), plus the partner's copy of it, in x[0 .. N).
template <int N, typename T, int P>
__device__ __forceinline__ void scatter_stage(T (&x)[P], bool upper, int o) {
  T y[N];
#pragma unroll
  for (int v = 0; v < N; ++v) y[v] = __shfl_xor_sync(0xffffffffu, upper ? x[v] : x[v + N], o);
#pragma unroll
  for (int v = 0; v < N; ++v) x[v] = (upper ? x[v + N] : x[v]) + y[v];
}
// x[v] summed over the 8 lanes that share t, for v = g * P / 8 + e, left in x[e] (e < P / 8).
template <typename T, int P>
__device__ __forceinline__ void reduce_scatter(T (&x)[P], const Lane& L) {
  static_assert(P % 8 == 0, "a value per lane at least");
  scatter_stage<P / 2>(x, (L.g & 4) != 0, 16);
  scatter_stage<P / 4>(x, (L.g & 2) != 0, 8);
  scatter_stage<P / 8>(x, (L.g & 1) != 0, 4);
}

// x over the 4 lanes that share t and the batch half (the lane's values of all capsules).
template <typename T>
__device__ __forceinline__ T sum_over_capsules(T x) {
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}
template <typename T>
__device__ __forceinline__ T max_over_capsules(T x) {
  x = fmax(x, __shfl_xor_sync(0xffffffffu, x, 8));
  return fmax(x, __shfl_xor_sync(0xffffffffu, x, 16));
}

// The value of the group's capsule jl for batch half h, from the lane that holds it (every
// lane of the warp must call it, jl a compile-time constant after unrolling).
template <typename acc_t, int NB>
__device__ __forceinline__ acc_t spread_at(const acc_t (&x)[NB], const Lane& L, int jl, int h) {
  return __shfl_sync(0xffffffffu, x[jl >> 2], ((jl & 3) * 2 + h) * 4 + L.t);
}

// p[((sb + s) * 2 + h) * K + k] += the lane's shares of <u_hat[b, i, j], x[k][b, j]> for the
// KB capsules j = j0 + s (prediction tiles uh, s * DT + dt), batch half h: the dot products
// that reduce_scatter then sums over the lanes. kPark: each row tile's values are also left at
// park[(k * kGroupRows + r) * kTileElems], r = (jl0 + s) * DT + dt its place in the group
// (jl0: capsule j0's; park points at the lane's slots), for a later walk to read back (see
// prediction_grad).
template <int DT, int K, int KB, bool kPark = false, typename acc_t>
__device__ __forceinline__ void add_dots(const LaneRows<acc_t> (&rows)[K], const Dims& n, int j0,
                                         int sb, const acc_t (&uh)[KB * DT][4],
                                         acc_t (&p)[8 * K], acc_t* park = nullptr,
                                         int jl0 = 0) {
#pragma unroll
  for (int s = 0; s < KB; ++s)
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int k = 0; k < K; ++k) {
        acc_t f[4];
        load_frag<DT>(rows[k], n, j0 + s, dt, f);
        if constexpr (kPark)
          store4(park + (k * kGroupRows + (jl0 + s) * DT + dt) * kTileElems, f);
        const acc_t(&u)[4] = uh[s * DT + dt];
        // (one product at a time: two FMAs, where a sum of two products took an FMUL, an FMA
        // and an add)
        acc_t& p0 = p[((sb + s) * 2) * K + k];
        acc_t& p1 = p[((sb + s) * 2 + 1) * K + k];
        p0 += u[0] * f[0];
        p0 += u[2] * f[2];
        p1 += u[1] * f[1];
        p1 += u[3] * f[3];
      }
}

// out[k][nb] = <u_hat[b, i, j], x[k][b, j]> for the lane's (j, b) of batch nb, for K arrays x
// laid out as V: V alone (the logits), or V and gs in the backward, where each prediction tile
// serves both dot products. 0 for capsules past N_out. kPark: the rows read are left in park
// too (add_dots).
template <int DT, int K, bool kPark = false, typename Src, typename acc_t>
__device__ __forceinline__ void agreements(const Src& src, const Dims& n, const Lane& L,
                                           const State<acc_t>& st, const acc_t* const (&x)[K],
                                           int64_t i, int64_t b0, int grp,
                                           acc_t (&out)[K][kBatches<DT>],
                                           acc_t* park = nullptr) {
  constexpr int GJ = kGroupRows / DT, KB = capsule_batch<Src, GJ>();
  static_assert(4 % KB == 0, "prediction batches within a batch of four capsules");
  LaneRows<acc_t> rows[K];
#pragma unroll
  for (int k = 0; k < K; ++k) rows[k] = lane_rows<DT>(x[k], st, n, L, b0);
#pragma unroll
  for (int nb = 0; nb < kBatches<DT>; ++nb)
#pragma unroll
    for (int k = 0; k < K; ++k) out[k][nb] = acc_t(0);
#pragma unroll
  for (int nb = 0; nb < kBatches<DT>; ++nb) {
    if (!has_capsule(n, grp * GJ + 4 * nb)) break;  // warp-uniform
    // p[(s * 2 + h) * K + k]: the lane's partial sums of capsule 4 nb + s, batch half h.
    acc_t p[8 * K] = {};
#pragma unroll
    for (int sb = 0; sb < 4; sb += KB) {
      const int jl0 = 4 * nb + sb;
      // (whole batches of four from staged operands, which hold zeros past N_out; other
      // sources read only the capsules that exist)
      if (sb > 0 && !has_capsule(n, grp * GJ + jl0)) break;  // warp-uniform
      acc_t uh[KB * DT][4];
      predict_tiles<DT>(src, n, L, i, b0, grp, jl0 * DT, uh);
      add_dots<DT, K, KB, kPark>(rows, n, grp * GJ + jl0, sb, uh, p, park, jl0);
    }
    reduce_scatter(p, L);
    const bool in = has_capsule(n, grp * GJ + spread_capsule(L, nb));
#pragma unroll
    for (int k = 0; k < K; ++k) out[k][nb] = in ? p[k] : acc_t(0);
  }
}

// acc[r][q] += w[capsule of r][batch half of q] * u_hat[r][q] for the row tiles of the KB
// capsules jb .. jb + KB - 1 (prediction tiles uh).
template <int DT, int KB, typename acc_t, int NB>
__device__ __forceinline__ void add_weighted(const acc_t (&uh)[KB * DT][4], const acc_t (&w)[NB],
                                             const Lane& L, int jb,
                                             acc_t (&acc)[kGroupRows][4]) {
#pragma unroll
  for (int jl = jb; jl < jb + KB; ++jl) {
    const acc_t w0 = spread_at(w, L, jl, 0), w1 = spread_at(w, L, jl, 1);
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int q = 0; q < 4; ++q)
        acc[jl * DT + dt][q] += (q & 1 ? w1 : w0) * uh[(jl - jb) * DT + dt][q];
  }
}

// acc[r][q] += w[capsule of r][batch half of q] * u_hat[r][q] over the group's row tiles.
template <int DT, typename Src, typename acc_t>
__device__ __forceinline__ void accumulate(const Src& src, const Dims& n, const Lane& L,
                                           int64_t i, int64_t b0, int grp,
                                           const acc_t (&w)[kBatches<DT>],
                                           acc_t (&acc)[kGroupRows][4]) {
  constexpr int GJ = kGroupRows / DT, KB = capsule_batch<Src, GJ>();
#pragma unroll
  for (int jb = 0; jb < GJ; jb += KB) {
    if (!has_capsule(n, grp * GJ + jb)) break;  // warp-uniform
    acc_t uh[KB * DT][4];
    predict_tiles<DT>(src, n, L, i, b0, grp, jb * DT, uh);
    add_weighted<DT, KB>(uh, w, L, jb, acc);
  }
}

// t = 1: every coupling coefficient is uniform_coupling(n), so the pass sums the predictions
// themselves, acc[r] += u_hat tile r, and scales the block's sums once when it writes them.
// A row tile takes three products and 4 FADDs (add_tiles), where accumulate adds 4 FMAs a
// tile and 2 shuffles a capsule to fetch the weights.
template <int DT, typename Src, typename acc_t>
__device__ __forceinline__ void sum_predictions(const Src& src, const Dims& n, const Lane& L,
                                                int64_t i, int64_t b0, int grp,
                                                acc_t (&acc)[kGroupRows][4]) {
  constexpr int GJ = kGroupRows / DT, KB = capsule_batch<Src, GJ>();
#pragma unroll
  for (int jb = 0; jb < GJ; jb += KB) {
    if (!has_capsule(n, grp * GJ + jb)) break;  // warp-uniform
    add_tiles<DT, KB * DT>(src, n, L, i, b0, grp, jb * DT, acc);
  }
}

// With several groups: the lane's (b, i) statistics over all capsules (launch_group_stats),
// the softmax's maximum m and sum of exponentials l (0 and 1 past B) ...
template <typename acc_t>
__device__ __forceinline__ void given_softmax_stats(const Dims& n, const Lane& L,
                                                    const State<acc_t>& st, int64_t i,
                                                    int64_t b0, acc_t& m, acc_t& l) {
  const int64_t b = spread_batch(L, b0);
  m = b < n.B ? st.stats[(b * n.N_in + i) * 2] : acc_t(0);
  l = b < n.B ? st.stats[(b * n.N_in + i) * 2 + 1] : acc_t(1);
}
// ... and the softmax backward's sum_k c_k g_k (0 past B).
template <typename acc_t>
__device__ __forceinline__ acc_t given_cg(const Dims& n, const Lane& L, const State<acc_t>& st,
                                          int64_t i, int64_t b0) {
  const int64_t b = spread_batch(L, b0);
  return b < n.B ? st.cg[b * n.N_in + i] : acc_t(0);
}

// The group's logits in c (agreements with V) become its coupling coefficients: the softmax
// over all capsules, whose statistics with several groups come from launch_group_stats
// (st.stats, which the launch code always provides then). One exp per value and one division
// per lane: expf and IEEE division are ~10 instructions each, and with 32 logits per lane (each
// lane had all of them) they outweighed the predictions. Capsules past N_out give 0.
template <int DT, typename acc_t>
__device__ __forceinline__ void softmax_coupling(const Dims& n, const Lane& L,
                                                 const State<acc_t>& st, int64_t i, int64_t b0,
                                                 int grp, acc_t (&c)[kBatches<DT>]) {
  constexpr int GJ = kGroupRows / DT;
  const int j0 = grp * GJ;
  acc_t m, l = acc_t(0);
  if (n.n_groups > 1) {
    given_softmax_stats(n, L, st, i, b0, m, l);
  } else {
    // Leaky routing: an extra logit 0 joins the softmax (its coefficient is dropped).
    m = n.leaky ? acc_t(0) : acc_t(-INFINITY);
#pragma unroll
    for (int nb = 0; nb < kBatches<DT>; ++nb)
      if (has_capsule(n, j0 + spread_capsule(L, nb))) m = fmax(m, c[nb]);
    m = max_over_capsules(m);
  }
#pragma unroll
  for (int nb = 0; nb < kBatches<DT>; ++nb) {
    c[nb] = has_capsule(n, j0 + spread_capsule(L, nb)) ? exp_(c[nb] - m) : acc_t(0);
    if (n.n_groups == 1) l += c[nb];
  }
  if (n.n_groups == 1) l = sum_over_capsules(l) + (n.leaky ? exp_(-m) : acc_t(0));
  const acc_t inv = acc_t(1) / l;
#pragma unroll
  for (int nb = 0; nb < kBatches<DT>; ++nb) c[nb] *= inv;
}

// The coupling coefficients c[b, i, j] of the lane's values of the group, at iteration t.
template <int DT, typename Src, typename acc_t>
__device__ __forceinline__ void coupling(const Src& src, const Dims& n, const Lane& L,
                                         const State<acc_t>& st, int64_t i, int64_t b0,
                                         int grp, acc_t (&c)[kBatches<DT>]) {
  if (st.first) {
    const acc_t uniform = uniform_coupling<acc_t>(n);
#pragma unroll
    for (int nb = 0; nb < kBatches<DT>; ++nb) c[nb] = uniform;
    return;
  }
  acc_t a[1][kBatches<DT>];
  agreements<DT, 1>(src, n, L, st, {st.V}, i, b0, grp, a);
#pragma unroll
  for (int nb = 0; nb < kBatches<DT>; ++nb) c[nb] = a[0][nb];
  softmax_coupling<DT>(n, L, st, i, b0, grp, c);
}

// dL/dc (before the softmax backward): g holds <gs[b, j], u_hat[b, i, j]>, to which grad_c
// (iteration r only) is added.
template <int DT, typename acc_t>
__device__ __forceinline__ void add_grad_c(const Dims& n, const Lane& L, const State<acc_t>& st,
                                           int64_t i, int64_t b0, int grp,
                                           acc_t (&g)[kBatches<DT>]) {
  if (st.grad_c == nullptr) return;
  const int64_t b = spread_batch(L, b0);
#pragma unroll
  for (int nb = 0; nb < kBatches<DT>; ++nb) {
    const int64_t j = int64_t(grp) * (kGroupRows / DT) + spread_capsule(L, nb);
    if (b < n.B && j < n.N_out) g[nb] += st.grad_c[coupling_row(n, b, i) + j];
  }
}

// Back through the softmax: g <- c * (g - sum_k c_k g_k), the sum over ALL capsules k (with
// several groups: st.cg, from launch_group_stats). On entry g holds dL/dc (add_grad_c).
template <int DT, typename acc_t>
__device__ __forceinline__ void coupling_grad(const Dims& n, const Lane& L, const State<acc_t>& st,
                                              int64_t i, int64_t b0,
                                              const acc_t (&c)[kBatches<DT>],
                                              acc_t (&g)[kBatches<DT>]) {
  acc_t cg = acc_t(0);
  if (n.n_groups > 1) {
    cg = given_cg(n, L, st, i, b0);
  } else {
#pragma unroll
    for (int nb = 0; nb < kBatches<DT>; ++nb) cg += c[nb] * g[nb];
    cg = sum_over_capsules(cg);
  }
#pragma unroll
  for (int nb = 0; nb < kBatches<DT>; ++nb) g[nb] = c[nb] * (g[nb] - cg);
}

// The backward's per-(b, i, j) quantities at an iteration t >= 2: the coupling coefficients c
// and the logit gradient g = dL/db (through the softmax). Computed predictions serve both
// dot products from one set of tiles; given ones (route) are loads, and two walks over them
// keep fewer values live. kPark (computed predictions): the rows of V and gs read are left in
// park, V's as k = kParkV and gs's as kParkGs (add_dots).
constexpr int kParkV = 0, kParkGs = 1;
template <int DT, bool kPark = false, typename Src, typename acc_t>
__device__ __forceinline__ void coupling_and_grad(const Src& src, const Dims& n, const Lane& L,
                                                  const State<acc_t>& st, int64_t i, int64_t b0,
                                                  int grp, acc_t (&c)[kBatches<DT>],
                                                  acc_t (&g)[kBatches<DT>],
                                                  acc_t* park = nullptr) {
  static_assert(!kPark || Src::kComputed, "rows are parked where computed predictions serve "
                                          "both dot products (route reads V and gs apart)");
  if constexpr (Src::kComputed) {
    acc_t a[2][kBatches<DT>];
    agreements<DT, 2, kPark>(src, n, L, st, {st.V, st.gs}, i, b0, grp, a, park);
#pragma unroll
    for (int nb = 0; nb < kBatches<DT>; ++nb) c[nb] = a[0][nb], g[nb] = a[1][nb];
    softmax_coupling<DT>(n, L, st, i, b0, grp, c);
  } else {
    coupling<DT>(src, n, L, st, i, b0, grp, c);
    acc_t a[1][kBatches<DT>];
    agreements<DT, 1>(src, n, L, st, {st.gs}, i, b0, grp, a);
#pragma unroll
    for (int nb = 0; nb < kBatches<DT>; ++nb) g[nb] = a[0][nb];
  }
  add_grad_c<DT>(n, L, st, i, b0, grp, g);
  coupling_grad<DT>(n, L, st, i, b0, c, g);
}

// A group's pass with several groups, from staged operands (capsule batches of four): with
// the statistics over all capsules given (st.stats, and st.cg in the gradient pass), a
// capsule's coupling (kGrad: its logit gradient) needs no other capsule's logit, so each
// batch's prediction tiles serve its agreements and then, weighted, the sums: one walk over
// the group's predictions, where coupling() (coupling_and_grad()) and accumulate() take two.
// c (and g) as those functions leave them, for store_couplings and keep_couplings; the
// forward passes its c as g too (unused).
template <int DT, bool kGrad, typename Src, typename acc_t>
__device__ __forceinline__ void group_walk(const Src& src, const Dims& n, const Lane& L,
                                           const State<acc_t>& st, int64_t i, int64_t b0,
                                           int grp, acc_t (&c)[kBatches<DT>],
                                           acc_t (&g)[kBatches<DT>],
                                           acc_t (&acc)[kGroupRows][4]) {
  constexpr int GJ = kGroupRows / DT, K = kGrad ? 2 : 1;
  static_assert(capsule_batch<Src, GJ>() == 4, "a batch's four capsules made together");
  LaneRows<acc_t> rows[K];
  rows[0] = lane_rows<DT>(st.V, st, n, L, b0);
  if (kGrad) rows[K - 1] = lane_rows<DT>(st.gs, st, n, L, b0);
  acc_t m, l;
  given_softmax_stats(n, L, st, i, b0, m, l);
  const acc_t inv = acc_t(1) / l, cg = kGrad ? given_cg(n, L, st, i, b0) : acc_t(0);
  const int64_t b = spread_batch(L, b0);
#pragma unroll
  for (int nb = 0; nb < kBatches<DT>; ++nb) {
    c[nb] = acc_t(0);
    if (kGrad) g[nb] = acc_t(0);
  }
#pragma unroll
  for (int nb = 0; nb < kBatches<DT>; ++nb) {
    if (!has_capsule(n, grp * GJ + 4 * nb)) break;  // warp-uniform
    acc_t uh[4 * DT][4];
    predict_tiles<DT>(src, n, L, i, b0, grp, 4 * nb * DT, uh);
    acc_t p[8 * K] = {};
    add_dots<DT, K, 4>(rows, n, grp * GJ + 4 * nb, 0, uh, p);
    reduce_scatter(p, L);
    const int j = grp * GJ + spread_capsule(L, nb);
    const bool in = has_capsule(n, j);
    // (the operations of softmax_coupling, add_grad_c and coupling_grad, in their order)
    c[nb] = in ? exp_(p[0] - m) : acc_t(0);
    c[nb] *= inv;
    if (kGrad) {
      acc_t dc = in ? p[K - 1] : acc_t(0);
      if (st.grad_c != nullptr && b < n.B && in) dc += st.grad_c[coupling_row(n, b, i) + j];
      g[nb] = c[nb] * (dc - cg);
    }
    add_weighted<DT, 4>(uh, kGrad ? g : c, L, 4 * nb, acc);
  }
}

// The couplings c (kGrad: and the logit gradients g, see coupling_and_grad) of the lane's
// values of capsule i at an iteration t >= 2, then their sums with the predictions into acc
// (kGrad: g's); `use()` stores c (and g) in between. With the statistics given (kGiven:
// several groups, staged operands) one walk over the predictions (group_walk), else two.
template <int DT, bool kGrad, bool kGiven, typename Src, typename acc_t, typename Use>
__device__ __forceinline__ void couplings_and_sums(const Src& src, const Dims& n, const Lane& L,
                                                   const State<acc_t>& st, int64_t i,
                                                   int64_t b0, int grp,
                                                   acc_t (&c)[kBatches<DT>],
                                                   acc_t (&g)[kBatches<DT>],
                                                   acc_t (&acc)[kGroupRows][4], Use&& use) {
  if constexpr (kGiven) {
    group_walk<DT, kGrad>(src, n, L, st, i, b0, grp, c, g, acc);
    use();
  } else {
    if (kGrad)
      coupling_and_grad<DT>(src, n, L, st, i, b0, grp, c, g);
    else
      coupling<DT>(src, n, L, st, i, b0, grp, c);
    use();
    accumulate<DT>(src, n, L, i, b0, grp, kGrad ? g : c, acc);
  }
}

// The gradient pass's c and logit gradient g of (b, i, j) for the last pass, which then needs
// neither predictions nor agreements. `kept` holds two planes (c, g) of [N_in, N_out, B'],
// B' = B rounded up to whole batch tiles: a warp's 8 batch elements of one (i, j) are one
// 32-byte run, which the lanes holding them write together (the last pass reads it as one pair
// per lane: lane t, batch 2t, 2t + 1). In [b, i, j] order the stores each wrote 4 bytes to 4
// sectors, and took the gradient pass 18 us more per call (H100, B=128). Past B the planes
// hold zeros.
__host__ __device__ inline int64_t kept_batch(const Dims& n) {
  return (n.B + kTileB - 1) / kTileB * kTileB;
}
__host__ __device__ inline int64_t kept_plane(const Dims& n) {
  return n.N_in * n.N_out * kept_batch(n);
}
// Where (b, i, j) is in a plane.
__host__ __device__ inline int64_t kept_index(const Dims& n, int64_t i, int64_t j, int64_t b) {
  return (i * n.N_out + j) * kept_batch(n) + b;
}
// Where iteration t's two planes start (t >= 2; see Sweep::kept).
__host__ __device__ inline int64_t kept_offset(const Dims& n, int64_t t) {
  return (t - 2) * 2 * kept_plane(n);
}
template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T x, y;
};
// Steps between a lane's pairs in the kept planes: from one capsule's to the next one's, from
// a c pair to its gbeta pair (a plane on), and from iteration t's pairs to t + 1's.
struct KeptSteps {
  int64_t capsule, plane, next_t;
};
__host__ __device__ inline KeptSteps kept_steps(const Dims& n) {
  return {kept_batch(n) / 2, kept_plane(n) / 2, (kept_offset(n, 3) - kept_offset(n, 2)) / 2};
}
// Where the lane's pair of the group's first capsule starts in a c plane, for (i, b0); capsule
// jl's is jl * kept_batch(n) / 2 pairs on, its logit gradient's kept_plane(n) / 2 pairs on.
template <int DT>
__device__ __forceinline__ int64_t kept_pair_offset(const Dims& n, const Lane& L, int64_t i,
                                                    int64_t b0, int grp) {
  return kept_index(n, i, grp * (kGroupRows / DT), b0 + 2 * L.t);
}
template <int DT, typename acc_t>
__device__ __forceinline__ void keep_couplings(const Dims& n, const Lane& L, acc_t* kept,
                                               int64_t i, int64_t b0, int grp,
                                               const acc_t (&c)[kBatches<DT>],
                                               const acc_t (&g)[kBatches<DT>]) {
  constexpr int GJ = kGroupRows / DT;
  const int64_t rows = kept_batch(n), b = spread_batch(L, b0);
  const bool in = b < n.B;
  // One pointer per plane, walked batch by batch (with each capsule's address made in 64
  // bits, the gradient pass spilled more: ptxas).
  acc_t* pc = kept + kept_index(n, i, grp * GJ + spread_capsule(L, 0), b);
  acc_t* pg = pc + kept_plane(n);
#pragma unroll
  for (int nb = 0; nb < kBatches<DT>; ++nb) {
    if (!has_capsule(n, grp * GJ + 4 * nb)) break;  // warp-uniform
    if (has_capsule(n, grp * GJ + spread_capsule(L, nb))) {
      pc[4 * nb * rows] = in ? c[nb] : acc_t(0);
      pg[4 * nb * rows] = in ? g[nb] : acc_t(0);
    }
  }
}

// --- softmax statistics over several groups ----------------------------------------------
//
// With several groups of output capsules, a group's pass needs the softmax over ALL capsules
// of each (b, i): its max m and sum l of exp(logit - m), and in the backward the softmax
// backward's sum cg = sum_k c_k g_k (g = dL/dc). Each group's are made by a pass of their own
// (Pass::kStats, which stages its batch tiles' V (and gs) in shared memory once per block, as
// every pass does), and merge_group_stats_kernel merges them in group order. A kernel that
// made every group's for one input capsule per block read 256 KB of V (and gs) per capsule
// at the 32768 x 64 shape, L1- and L2-bound (Nsight Compute).
//
// m, l and e = sum of exp(logit - m) g over the values added so far, e rescaled with l
// whenever m grows (online softmax). l = 0 holds nothing.
template <typename acc_t>
struct SoftmaxStats {
  acc_t m = -INFINITY, l = acc_t(0), e = acc_t(0);
  __device__ __forceinline__ void add(acc_t m2, acc_t l2, acc_t e2) {
    const acc_t mx = fmax(m, m2);
    const acc_t s1 = l == acc_t(0) ? acc_t(0) : exp_(m - mx);
    const acc_t s2 = l2 == acc_t(0) ? acc_t(0) : exp_(m2 - mx);
    l = l * s1 + l2 * s2;
    e = e * s1 + e2 * s2;
    m = mx;
  }
};
// Values per (grp, b, i) of the groups' statistics: (m, l), and e with the backward's sums.
__host__ __device__ inline int stats_values(bool sums) { return sums ? 3 : 2; }

// The group's statistics for (b, i) of the warp's batch tile, over its logits <u_hat, V> and,
// where st.gs is given, the sums with dL/dc = <u_hat, gs> (+ grad_c): one walk over the
// group's predictions. Written by lanes g = 0, 1 (batch half g) to
// part[((grp * B + b) * N_in + i) * stats_values + {0, 1, 2}].
template <int DT, typename Src, typename acc_t>
__device__ __forceinline__ void group_partial_stats(const Src& src, const Dims& n, const Lane& L,
                                                   const State<acc_t>& st, int64_t i, int64_t b0,
                                                   int grp, acc_t* part) {
  constexpr int GJ = kGroupRows / DT;
  const bool sums = st.gs != nullptr;
  SoftmaxStats<acc_t> x;
  if (sums) {
    acc_t ag[2][kBatches<DT>];  // logits, dL/dc
    agreements<DT, 2>(src, n, L, st, {st.V, st.gs}, i, b0, grp, ag);
    add_grad_c<DT>(n, L, st, i, b0, grp, ag[1]);
#pragma unroll
    for (int nb = 0; nb < kBatches<DT>; ++nb)
      if (has_capsule(n, grp * GJ + spread_capsule(L, nb))) x.add(ag[0][nb], acc_t(1), ag[1][nb]);
  } else {
    acc_t a[1][kBatches<DT>];
    agreements<DT, 1>(src, n, L, st, {st.V}, i, b0, grp, a);
#pragma unroll
    for (int nb = 0; nb < kBatches<DT>; ++nb)
      if (has_capsule(n, grp * GJ + spread_capsule(L, nb))) x.add(a[0][nb], acc_t(1), acc_t(0));
  }
  // The 4 lanes that share the batch half: each side adds the same two terms (in swapped
  // order), so that they end with the same bits.
#pragma unroll
  for (int o = 8; o <= 16; o <<= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, x.m, o);
    const acc_t l2 = __shfl_xor_sync(0xffffffffu, x.l, o);
    const acc_t e2 = sums ? __shfl_xor_sync(0xffffffffu, x.e, o) : acc_t(0);
    x.add(m2, l2, e2);
  }
  const int64_t b = spread_batch(L, b0);
  if (L.g >= 2 || b >= n.B) return;
  const int S = stats_values(sums);
  acc_t* out = part + ((int64_t(grp) * n.B + b) * n.N_in + i) * S;
  out[0] = x.m;
  out[1] = x.l;
  if (sums) out[2] = x.e;
}

// stats[b, i] = (m, l) over all groups (and leaky routing's extra logit 0), and with `cg`
// cg[b, i] = e / l: one thread per (b, i), the groups merged in order.
template <typename acc_t>
__global__ void merge_group_stats_kernel(Dims n, const acc_t* __restrict__ part,
                                         acc_t* __restrict__ stats, acc_t* __restrict__ cg) {
  const int64_t bi = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bi >= n.B * n.N_in) return;
  const int S = stats_values(cg != nullptr);
  SoftmaxStats<acc_t> x;
  for (int grp = 0; grp < n.n_groups; ++grp) {
    const acc_t* p = part + (int64_t(grp) * n.B * n.N_in + bi) * S;
    x.add(p[0], p[1], cg != nullptr ? p[2] : acc_t(0));
  }
  // The extra logit 0 of leaky routing (its coefficient is dropped: no dL/dc).
  if (n.leaky) x.add(acc_t(0), acc_t(1), acc_t(0));
  stats[bi * 2] = x.m;
  stats[bi * 2 + 1] = x.l;
  if (cg != nullptr) cg[bi] = x.e / x.l;
}

// --- asynchronous copies to shared memory (sm_80+) ------------------------------------

#ifdef CAPSROUTE_EMULATE
using emu::cp_async16;
using emu::cp_async_commit;
using emu::cp_async_wait_all;
using emu::cp_async_wait_one;
#else
// (Compute capability 8.0 and newer; older architectures compile traps, see mma_tf32.)
#if __CUDA_ARCH__ >= 800
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most one group (the newest) of this thread's copies is still in flight.
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }
// Waits until all of this thread's copies have landed.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
#else
__device__ __forceinline__ void cp_async16(void*, const void*) { __trap(); }
__device__ __forceinline__ void cp_async_commit() {}
__device__ __forceinline__ void cp_async_wait_one() {}
__device__ __forceinline__ void cp_async_wait_all() {}
#endif
#endif

// --- barriers of two warps; L1 prefetches --------------------------------------------------

// bar.sync id, 64: the two warps of a pair meet at named barrier `id` (1 .. 15; 0 is
// __syncthreads'), which also orders their shared-memory accesses, as __syncthreads does.
// prefetch_l1: asks for the line holding p in L1 without waiting for it (no-op emulated).
#ifdef CAPSROUTE_EMULATE
inline void pair_barrier(int id) { emu::named_barrier(id, 64); }
inline void prefetch_l1(const void*) {}
#else
__device__ __forceinline__ void pair_barrier(int id) {
  asm volatile("bar.sync %0, 64;\n" ::"r"(id) : "memory");
}
__device__ __forceinline__ void prefetch_l1(const void* p) {
  asm volatile("prefetch.global.L1 [%0];\n" ::"l"(p));
}
#endif

// --- thread-block clusters (sm_90) -------------------------------------------------------

// cluster_sync: every thread of the cluster meets (barrier.cluster, whose arrive releases and
// wait acquires: what a block wrote to its shared memory before is visible to the others
// after; not .aligned, which would need the warp converged there); cluster_rank: the block's
// rank in its cluster; cluster_shared: the address in block `rank`'s shared memory of what p
// addresses in the caller's (mapa), for loads.
// Launched with clusters only on a GPU that has them (launch_row_pass).
#ifdef CAPSROUTE_EMULATE
using emu::cluster_rank;
using emu::cluster_shared;
using emu::cluster_sync;
#else
__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive;\nbarrier.cluster.wait;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ int cluster_rank() {
  unsigned r = 0;
#if __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#else
  __trap();
#endif
  return static_cast<int>(r);
}
template <typename T>
__device__ __forceinline__ const T* cluster_shared(const T* p, int rank) {
  uint64_t out = 0;
#if __CUDA_ARCH__ >= 900
  asm volatile("mapa.u64 %0, %1, %2;\n"
               : "=l"(out)
               : "l"(reinterpret_cast<uint64_t>(p)), "r"(rank));
#else
  __trap();
#endif
  return reinterpret_cast<const T*>(out);
}
#endif

// Output capsules of group grp: the first, and how many (the last group may be short).
__device__ __forceinline__ int64_t group_j0(const Dims& n, int grp) {
  return int64_t(grp) * n.caps_per_group;
}
__device__ __forceinline__ int64_t group_caps(const Dims& n, int grp) {
  return min(int64_t(n.caps_per_group), n.N_out - group_j0(n, grp));
}

// Copies `elems` elements of W (whole rows of W[i]) into shared memory: 16-byte asynchronous
// copies when D_in % 8 == 0 and W is 16-byte aligned (rows8), plain loads and stores
// otherwise. stage_weight: group grp's rows of W[i] (capsules j0 .. j0 + count - 1:
// [count, D_out, D_in], contiguous). By the block's threads, or with kWarp by one warp's
// lanes (a template parameter: as thread parameters the block's form tipped
// routing_pass_kernel's gradient pass, DT = 2, into 8 bytes of spills).
template <bool kWarp = false, typename scalar_t>
__device__ __forceinline__ void copy_weight(const Dims& n, const scalar_t* from, int64_t elems,
                                            scalar_t* dst) {
  if (n.rows8) {
    constexpr int kPer = 16 / sizeof(scalar_t);
    for (int64_t e = int64_t(kWarp ? threadIdx.x & 31 : threadIdx.x) * kPer; e < elems;
         e += int64_t(kWarp ? 32 : blockDim.x) * kPer)
      cp_async16(dst + e, from + e);
  } else {
    for (int64_t e = kWarp ? threadIdx.x & 31 : threadIdx.x; e < elems;
         e += kWarp ? 32 : blockDim.x)
      dst[e] = from[e];
  }
}
template <bool kWarp = false, typename scalar_t>
__device__ __forceinline__ void stage_weight(const WeightSource<scalar_t>& src, const Dims& n,
                                             int64_t i, int grp, scalar_t* dst) {
  const int64_t row = n.D_out * n.D_in;
  copy_weight<kWarp>(n, src.W + i * n.J * n.D_in + group_j0(n, grp) * row,
                     group_caps(n, grp) * row, dst);
}
template <typename scalar_t, int kChunks>
__device__ __forceinline__ void stage_weight(const FragmentSource<scalar_t, kChunks>& src,
                                             const Dims& n, int64_t i, int grp, scalar_t* dst) {
  stage_weight(WeightSource<scalar_t>{src.u, src.W}, n, i, grp, dst);
}
template <typename scalar_t>
__device__ __forceinline__ void stage_weight(const GivenSource<scalar_t>&, const Dims&, int64_t,
                                             int, scalar_t*) {}

// Group grp's rows of W[i], as staged by stage_weight in `raw`, rewritten as the A operands
// of predict_tile (layout in FragmentSource): lane (g, t) of row tile r and chunk c holds
// rows (r % DT) * 16 + {g, g + 8} and input dims 8c + {t, t + 4}, split into TF32 parts, with
// zeros past D_out and D_in, and for the row tiles past the group's capsules (made in
// batches, see capsule_batch). Made once per input capsule by the whole block, instead of by
// every warp at every use of a tile.
template <int DT, int kChunks, typename scalar_t>
__device__ __forceinline__ void build_fragments(const scalar_t* raw, const Dims& n, int grp,
                                                uint4* Wf) {
  using S = Scalar<scalar_t>;
  constexpr bool kExact = !std::is_same<scalar_t, float>::value;
  constexpr int P = FragmentSource<scalar_t>::kParts;
  const int D_in = static_cast<int>(n.D_in), D_out = static_cast<int>(n.D_out);
  const int KC = kChunks > 0 ? kChunks : n.k_chunks;  // (a division below)
  const int caps = static_cast<int>(group_caps(n, grp));
  for (int e = threadIdx.x; e < kGroupRows * KC * 32; e += blockDim.x) {
    const int lane = e & 31, c = (e >> 5) % KC, r = (e >> 5) / KC;
    const int d0 = (r % DT) * kTileD + (lane >> 2), k0 = c * 8 + (lane & 3);
    const scalar_t* w = raw + (r / DT) * (D_out * D_in);
    auto at = [&](int d, int k) {
      return r / DT < caps && d < D_out && k < D_in ? S::load(w + (d * D_in + k)) : 0.f;
    };
    uint32_t hi[4], lo[4] = {0, 0, 0, 0};
    split_tf32<kExact>(at(d0, k0), hi[0], lo[0]);
    split_tf32<kExact>(at(d0 + 8, k0), hi[1], lo[1]);
    split_tf32<kExact>(at(d0, k0 + 4), hi[2], lo[2]);
    split_tf32<kExact>(at(d0 + 8, k0 + 4), hi[3], lo[3]);
    uint4* f = Wf + (r * KC + c) * P * 32 + lane;
    f[0] = uint4{hi[0], hi[1], hi[2], hi[3]};
    if (P == 2) f[32] = uint4{lo[0], lo[1], lo[2], lo[3]};
  }
}

// The warp's u[b, i] as B operands of predict_tile: lane (g, t) holds batch element b0 + g,
// input dims 8c + {t, t + 4} of each chunk c, split into TF32 parts (zeros past B and D_in).
// Each lane reads back only what it wrote: no synchronisation needed. load_u reads the
// values (kChunks > 0: the pass kernels read them a capsule ahead, so that the wait for
// memory overlaps the capsule before; ncu put 10% of the forward pass's stalls on it),
// store_u writes the operands, stage_u does both. u_at: u[b, i, k], 0 past B and D_in.
template <typename scalar_t>
__device__ __forceinline__ typename Scalar<scalar_t>::acc u_at(const scalar_t* u, const Dims& n,
                                                               int64_t b, int64_t i, int64_t k) {
  return b < n.B && k < n.D_in ? Scalar<scalar_t>::load(u + (b * n.N_in + i) * n.D_in + k)
                               : typename Scalar<scalar_t>::acc(0);
}
template <typename scalar_t, int kChunks>
__device__ __forceinline__ void load_u(const FragmentSource<scalar_t, kChunks>& src, const Dims& n,
                                       const Lane& L, int64_t i, int64_t b0,
                                       float (&x)[kChunks][2]) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c)
#pragma unroll
    for (int h = 0; h < 2; ++h) x[c][h] = u_at(src.u, n, b0 + L.g, i, c * 8 + L.t + 4 * h);
}
template <typename scalar_t, int kChunks>
__device__ __forceinline__ void store_u(const FragmentSource<scalar_t, kChunks>& src, int c,
                                        const float (&x)[2]) {
  constexpr bool kExact = !std::is_same<scalar_t, float>::value;
  uint32_t h[2], l[2] = {0, 0};
  split_tf32<kExact>(x[0], h[0], l[0]);
  split_tf32<kExact>(x[1], h[1], l[1]);
  src.Uf[c * 32 + (threadIdx.x & 31)] = uint4{h[0], h[1], l[0], l[1]};
}
template <typename scalar_t, int kChunks>
__device__ __forceinline__ void stage_u(const FragmentSource<scalar_t, kChunks>& src, const Dims& n,
                                        const Lane& L, int64_t i, int64_t b0) {
  const int chunks = kChunks > 0 ? kChunks : n.k_chunks;
  for (int c = 0; c < chunks; ++c) {
    const float x[2] = {u_at(src.u, n, b0 + L.g, i, c * 8 + L.t),
                        u_at(src.u, n, b0 + L.g, i, c * 8 + L.t + 4)};
    store_u(src, c, x);
  }
}

// --- kernels ---------------------------------------------------------------------------

// c_out[b, i, j] = the lane's coupling coefficients c (spread, see kBatches), each lane its own.
template <int DT, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_couplings(const Dims& n, const Lane& L, int64_t i,
                                                int64_t b0, int grp, const acc_t (&c)[kBatches<DT>],
                                                scalar_t* c_out) {
  const int64_t b = spread_batch(L, b0);
#pragma unroll
  for (int nb = 0; nb < kBatches<DT>; ++nb) {
    const int64_t j = int64_t(grp) * (kGroupRows / DT) + spread_capsule(L, nb);
    if (b < n.B && j < n.N_out)
      c_out[coupling_row(n, b, i) + j] = Scalar<scalar_t>::store(c[nb]);
  }
}

// kForward: the forward's iterations t >= 2; kFirst: its first, whose couplings are uniform
// (no agreements, see sum_predictions); kStats: several groups of output capsules, the softmax
// statistics of each group's capsules (see group_partial_stats). The others sum over input
// capsules. (kFirst last: profiles name the kernels by number, (Pass)0 is still the forward.)
enum class Pass { kForward, kGradient, kStats, kFirst };

// The tiled arrays a pass stages in shared memory (the launch code sizes the allocation with
// the same count): V, and gs for the gradient (and the statistics with their sums); none at
// t = 1 (V = 0).
template <Pass kPass, typename acc_t>
__host__ __device__ inline int pass_tiles(const State<acc_t>& st) {
  if (kPass == Pass::kFirst) return 0;
  return kPass == Pass::kGradient || st.gs != nullptr ? 2 : 1;
}

// Byte offsets in the shared memory of a kernel that computes predictions from W[i]:
// [head: the kernel's own tiles][W[i] as copied][with fragments (FragmentSource): the A
// operands, kGroupRows row tiles per group of `groups`][each of `warps` warps' B operands].
// The launch code sizes the allocation with the same function.
struct SmemLayout {
  size_t w, wf, uf, end;
};
template <typename scalar_t>
__host__ __device__ inline SmemLayout smem_layout(const Dims& n, size_t head, size_t w_bytes,
                                                  bool fragments, int groups, int warps) {
  auto up16 = [](size_t x) { return (x + 15) / 16 * 16; };
  const size_t operand = size_t(n.k_chunks) * 32 * sizeof(uint4);  // a chunk, all lanes
  const size_t parts = !fragments ? 0 : std::is_same<scalar_t, float>::value ? 2 : 1;
  SmemLayout p;
  p.w = up16(head);
  p.wf = up16(p.w + w_bytes);
  p.uf = p.wf + size_t(groups) * kGroupRows * parts * operand;
  p.end = p.uf + (fragments ? warps * operand : 0);
  return p;
}

// A pass kernel's: head = [V tile][gs tile] (tiles_shared); W[i]: w_shared, two buffers
// (double-buffered copies) or one with fragments (rewritten before the next copy lands).
template <typename scalar_t, typename acc_t>
__host__ __device__ inline SmemLayout pass_layout(const Dims& n, int tiles, bool fragments) {
  const size_t tile_bytes =
      n.tiles_shared ? size_t(tiles) * n.warps * widest_group_caps(n) * row_tiles(n) * kTileElems *
                           sizeof(acc_t)
                     : 0;
  const size_t w_bytes =
      n.w_shared ? size_t(fragments ? 1 : 2) * widest_group_cols(n) * n.D_in * sizeof(scalar_t)
                 : 0;
  return smem_layout<scalar_t>(n, tile_bytes, w_bytes, fragments, 1, n.warps);
}

// One pass over the input capsules for iteration t. A block owns `warps` batch tiles (a warp
// each) and a chunk of input capsules; all its warps read the same W[i], staged once in
// shared memory for the block, and the block's rows of V (and gs) sit in shared memory too.
// W[i] is staged in one of two ways: for FragmentSource, copied (the next capsule's copy in
// flight while this one is used) and rewritten by the block as the matrix units' operands
// (build_fragments); otherwise double-buffered as it is (float64), or read from global memory
// where it does not fit.
// grid = (n_chunks, ceil(B / (8 * warps)), n_groups).
//   kFirst, kForward: partial[chunk] = sum_i c_ij u_hat_ij;  c written when c_out != null.
//   kGradient: partial[chunk] = sum_i gbeta_ij u_hat_ij (the logit-gradient term G).
//   kStats:    partial = the group's softmax statistics per (b, i) (group_partial_stats),
//              with the softmax backward's sums when st.gs is given (then V and gs tiles).
// kGiven (kForward, kGradient; several groups, staged operands): the statistics over all
// capsules given, one walk over the predictions (group_walk). A template parameter, not a
// branch on n_groups: with both walks in one kernel the gradient pass spilled 176 bytes
// (ptxas, float), where either alone spills 0 (two walks) or 40.
template <Pass kPass, int DT, typename Src, typename scalar_t, bool kGiven = false>
__global__ void __launch_bounds__(kThreads, kPassBlocksPerSM)
routing_pass_kernel(Src src, Dims n, State<typename Scalar<scalar_t>::acc> st,
                    typename Scalar<scalar_t>::acc* __restrict__ partial,
                    scalar_t* __restrict__ c_out) {
  using acc_t = typename Scalar<scalar_t>::acc;
  constexpr int GJ = kGroupRows / DT;
  const int n_tiles = pass_tiles<kPass>(st);
  unsigned char* smem_raw = dynamic_smem<unsigned char>();
  const Lane L;
  const int warp = threadIdx.x >> 5;
  const int64_t block_b0 = int64_t(blockIdx.y) * n.warps * kTileB;
  const int64_t b0 = block_b0 + int64_t(warp) * kTileB;
  const bool has_rows = b0 < n.B;  // warp-uniform; idle warps still join the barriers
  const int grp = blockIdx.z;
  const int64_t i_begin = int64_t(blockIdx.x) * n.i_per_block;
  const int64_t i_end = min(i_begin + n.i_per_block, n.N_in);

  const SmemLayout smem = pass_layout<scalar_t, acc_t>(n, n_tiles, Src::kFragments);
  // A warp's tile of V (or gs): its batch tile's row tiles of the widest group's capsules.
  const int64_t warp_tile = widest_group_caps(n) * DT * kTileElems;
  const int64_t tile_elems = n.tiles_shared ? n.warps * warp_tile : 0;
  acc_t* tiles = reinterpret_cast<acc_t*>(smem_raw);
  scalar_t* wbuf = reinterpret_cast<scalar_t*>(smem_raw + smem.w);
  // A buffer holds one group's rows of W[i].
  const int64_t w_elems = widest_group_cols(n) * n.D_in;
  if constexpr (Src::kFragments) {
    src.Wf = reinterpret_cast<uint4*>(smem_raw + smem.wf);
    src.Uf = reinterpret_cast<uint4*>(smem_raw + smem.uf) + warp * n.k_chunks * 32;
  }

  if constexpr (Src::kComputed)
    if (n.w_shared) {
      stage_weight(src, n, i_begin, grp, wbuf);
      cp_async_commit();
    }
  // The block's tiles of V (and gs), its group's capsules (none at t = 1: V = 0).
  if (n_tiles > 0 && n.tiles_shared && !st.first) {
    // Each warp its own batch tile, one contiguous run of the tiled array, in 16-byte
    // asynchronous copies all in flight together (a warp past B has none, and reads none).
    if (has_rows) {
      const int64_t from = ((b0 / kTileB) * n.N_out + group_j0(n, grp)) * DT * kTileElems;
      const int pieces =
          static_cast<int>(group_caps(n, grp) * DT * kTileElems * sizeof(acc_t) / 16);
#pragma unroll
      for (int k = 0; k < n_tiles; ++k) {
        const unsigned char* src_bytes =
            reinterpret_cast<const unsigned char*>((k == 0 ? st.V : st.gs) + from);
        unsigned char* dst_bytes =
            reinterpret_cast<unsigned char*>(tiles + k * tile_elems + warp * warp_tile);
        for (int x = threadIdx.x & 31; x < pieces; x += 32)
          cp_async16(dst_bytes + 16 * x, src_bytes + 16 * x);
      }
    }
    cp_async_commit();
    cp_async_wait_all();  // (W[i_begin]'s copy too: it is needed first anyway)
    st.V = tiles;
    if (n_tiles == 2) st.gs = tiles + tile_elems;
    st.b_base = block_b0;
    st.caps = widest_group_caps(n);
    st.j_base = group_j0(n, grp);
  }
  __syncthreads();

  acc_t acc[kGroupRows][4], c[kBatches<DT>];
#pragma unroll
  for (int r = 0; r < kGroupRows; ++r)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[r][q] = acc_t(0);
  // The next capsule's u values (see load_u), where the chunk count is compiled in.
  constexpr int kPrefetch = Src::kFragments ? Src::kChunks : 0;
  float u_next[kPrefetch > 0 ? kPrefetch : 1][2];
  if constexpr (kPrefetch > 0)
    if (has_rows && i_begin < i_end) load_u(src, n, L, i_begin, b0, u_next);

  for (int64_t i = i_begin; i < i_end; ++i) {
    if constexpr (Src::kFragments) {
      // W[i] has landed (this thread's copies; after the barrier, everyone's) and no warp
      // reads the previous capsule's operands any more: rewrite W[i] as operands, then
      // (second barrier: the copy is read) fetch W[i + 1] into the same buffer.
      cp_async_wait_all();
      __syncthreads();
      build_fragments<DT, Src::kChunks>(wbuf, n, grp, src.Wf);
      __syncthreads();
      if (i + 1 < i_end) stage_weight(src, n, i + 1, grp, wbuf);
      cp_async_commit();
      if constexpr (kPrefetch > 0) {
        if (has_rows) {
#pragma unroll
          for (int c = 0; c < kPrefetch; ++c) store_u(src, c, u_next[c]);
          if (i + 1 < i_end) load_u(src, n, L, i + 1, b0, u_next);
        }
      } else if (has_rows) {
        stage_u(src, n, L, i, b0);
      }
    } else if constexpr (Src::kComputed) {
      if (n.w_shared) {
        if (i + 1 < i_end)
          stage_weight(src, n, i + 1, grp, wbuf + ((i + 1 - i_begin) & 1) * w_elems);
        cp_async_commit();
        cp_async_wait_one();  // W[i] has landed
        __syncthreads();
        src.Wi = wbuf + ((i - i_begin) & 1) * w_elems;
        src.wi_j0 = group_j0(n, grp);
      } else {
        src.Wi = src.W + i * n.J * n.D_in;
      }
    }
    if (has_rows) {
      if constexpr (kPass == Pass::kStats) {
        group_partial_stats<DT>(src, n, L, st, i, b0, grp, partial);
      } else if constexpr (kPass == Pass::kFirst) {
        if (c_out != nullptr) {
#pragma unroll
          for (int nb = 0; nb < kBatches<DT>; ++nb) c[nb] = uniform_coupling<acc_t>(n);
          store_couplings<DT>(n, L, i, b0, grp, c, c_out);
        }
        sum_predictions<DT>(src, n, L, i, b0, grp, acc);
      } else if constexpr (kPass == Pass::kForward) {
        couplings_and_sums<DT, false, kGiven>(src, n, L, st, i, b0, grp, c, c, acc, [&] {
          if (c_out != nullptr) store_couplings<DT>(n, L, i, b0, grp, c, c_out);
        });
      } else {  // t >= 2
        acc_t g[kBatches<DT>];
        couplings_and_sums<DT, true, kGiven>(src, n, L, st, i, b0, grp, c, g, acc, [&] {
          if (st.kept != nullptr) keep_couplings<DT>(n, L, st.kept, i, b0, grp, c, g);
        });
      }
    }
    if (Src::kComputed && !Src::kFragments && n.w_shared)
      __syncthreads();  // the buffer is refilled next round
  }

  // The block's partial sum over its capsules, for the warp's batch tile (at t = 1 the sum of
  // the predictions, see sum_predictions, times the coupling coefficient they all share).
  if (kPass == Pass::kStats || !has_rows) return;
  const acc_t scale = kPass == Pass::kFirst ? uniform_coupling<acc_t>(n) : acc_t(1);
#pragma unroll
  for (int r = 0; r < kGroupRows; ++r) {
    const int64_t j = int64_t(grp) * GJ + r / DT;
    if (j >= n.N_out) break;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t b = b0 + L.col(q);
      const int d = L.dim(r % DT, q);
      if (b < n.B && d < n.D_out)
        partial[(int64_t(blockIdx.x) * n.B + b) * n.J + j * n.D_out + d] = scale * acc[r][q];
    }
  }
}

// --- passes with the batch as the products' rows -------------------------------------------
//
// routing_pass_kernel makes a prediction tile as W[i, j] (16 output dims) times u of 8 batch
// elements, so every warp reloads W[i]'s operands for its 8 batch elements, twice a pass: on
// the H100 they were 196 of the forward pass's 275 shared-memory wavefronts per warp and
// capsule, with L1/TEX 77% busy (Nsight Compute, eleventh session). Here the product is turned
// around: A = u[b, i, :] of 16 batch elements (m16 x k8), B = W[i] of 8 output columns (k8 x
// n8), so each W operand serves 16 batch elements, and the per-(b, j) values land in the
// lanes that own batch rows g and g + 8: a logit is a dot product summed over the 4 lanes t,
// and a row's softmax is over the lanes t and t ^ 1 that hold it after a reduce-scatter.
//
// Used for the forward's passes and the backward's gradient passes of dynamic_routing where a
// layer is at most 20 column tiles of 8 output dims: D_in <= 8, D_out <= 16,
// N_out * ceil(D_out / 8) <= 20 (16 with D_out <= 8), float32 or the half types
// (row_pass_supported). A block's warps go in pairs over 16 batch
// elements, each warp with half of the capsules (10 column tiles of the MNIST layer): its
// logits, and its sums in 40 registers (all 20 tiles' would take 80). The softmax over all
// capsules merges the two warps' maxima and sums of exponentials, exchanged through shared
// memory (a third barrier per capsule); making every logit in both warps instead, as a
// first form did, cost as many matrix products as it saved (benchmarks/RESULTS.md). V comes
// in the row layout (row_layout_offset), a lane's accumulator fragment in one 16-byte load,
// written so by finish_iteration.
constexpr int kRowsB = 16;  // batch elements per warp (the products' rows)

// Column tiles (8 output dims each) of one warp in the row passes: capsules times DT8 =
// ceil(D_out / 8) tiles, at most 20 (10 capsules of 9..16 dims; 16 of <= 8 dims: one group).
template <int DT8>
constexpr int kRowCols = DT8 == 1 ? 16 : 20;

// V in the row layout: [ceil(B / 16) row tiles][N_out * DT8 column tiles][32 lanes][4 slots],
// lane (g, t) and slot q = 2h + e holding (b = 16 rt + g + 8h, d = 8 (ct % DT8) + 2t + e) of
// capsule ct / DT8: the accumulator fragment of the product (see mma_tf32), whole.
__host__ __device__ inline int row_dt8(const Dims& n) {
  return static_cast<int>((n.D_out + 7) / 8);
}
__host__ __device__ inline int64_t row_layout_elems(const Dims& n) {
  return (n.B + kRowsB - 1) / kRowsB * n.N_out * row_dt8(n) * kTileElems;
}
__host__ __device__ inline int64_t row_layout_offset(const Dims& n, int64_t b, int64_t j, int d) {
  const int m = static_cast<int>(b % kRowsB), e = d % 8;
  const int lane = (m % 8) * 4 + e / 2, q = (m / 8) * 2 + e % 2;
  return (((b / kRowsB) * n.N_out + j) * row_dt8(n) + d / 8) * kTileElems + lane * 4 + q;
}

// kRowCols of the layer's DT8 (1 or 2).
__host__ __device__ inline int row_cols_max(const Dims& n) {
  return row_dt8(n) == 1 ? kRowCols<1> : kRowCols<2>;
}

// Whether the forward's passes and the backward's gradient passes may run on row_pass_kernel
// (see above); the operand types are the caller's to check (float32, float16, bfloat16).
__host__ __device__ inline bool row_pass_supported(const Dims& n) {
  return n.n_groups == 1 && n.k_chunks == 1 && row_dt8(n) <= 2 &&
         n.N_out * row_dt8(n) <= row_cols_max(n);
}

// The arrays of the row layout that a row pass stages (the launch code sizes its shared
// memory with the same count): V, and gs in the gradient pass; none at t = 1 (V = 0).
template <Pass kPass>
constexpr int row_pass_tiles() {
  return kPass == Pass::kFirst ? 0 : kPass == Pass::kGradient ? 2 : 1;
}

// Shared memory of row_pass_kernel (bytes): [V: the block's row tiles, kRowCols column tiles
// each (zeros past N_out), and gs's after them in the gradient pass; none at t = 1][W[i] as
// copied][W[i] as B operands: a uint4 (hi pair, lo pair) per lane and column tile, all
// kRowCols of them (zeros past N_out)][the pairs' softmax statistics: 3 values per warp and
// row]. With `direct` (the lanes read W[i] themselves) no W[i] but in the forward pass at
// t >= 2 each warp's own operands, [warp][kRowCols / 2][32 lanes] uint4 (the gradient pass
// has no room for them beside V and gs at two blocks per multiprocessor), and the
// statistics twice (for even and odd input capsules: see row_pass_kernel). With clusters, at
// least room for the block's sums at the end, [warp][kRowCols / 2][32 lanes] float4, over
// everything else (which the walk no longer needs by then).
struct RowLayout {
  size_t w, wf, stats, end;
};
constexpr int kRowStats = 3;
__host__ __device__ constexpr int row_stats_elems(int row_tiles) {
  return row_tiles * 2 * kRowsB * kRowStats;  // [warp][16 rows][kRowStats]
}
template <Pass kPass>
constexpr bool row_pass_parks(bool direct) {
  return direct && kPass == Pass::kForward;
}
template <Pass kPass, typename scalar_t>
__host__ __device__ inline RowLayout row_layout(const Dims& n, int row_tiles, bool direct) {
  auto up16 = [](size_t x) { return (x + 15) / 16 * 16; };
  const size_t max_cols = row_cols_max(n);
  RowLayout p;
  p.w = size_t(row_pass_tiles<kPass>()) * row_tiles * max_cols * kTileElems * sizeof(float);
  p.wf = direct ? p.w : up16(p.w + size_t(n.J) * n.D_in * sizeof(scalar_t));
  p.stats = !direct ? p.wf + max_cols * 32 * sizeof(uint4)
            : row_pass_parks<kPass>(direct) ? p.wf + row_tiles * max_cols * 32 * sizeof(uint4)
                                            : p.wf;
  p.end = p.stats + (direct ? 2 : 1) * row_stats_elems(row_tiles) * sizeof(float);
  const size_t sums = size_t(row_tiles) * max_cols * 32 * sizeof(float4);
  if (n.cluster > 1 && p.end < sums) p.end = sums;
  return p;
}

// The arrays of one row pass: V^(t-1) and (gradient) dL/ds^(t) in the row layout; and in the
// gradient pass grad_c (dL/dc^(r), [B, N_in, N_out], at t = r only, else null) and where it
// keeps c^(t) and the logit gradient for the last pass (see keep_couplings), or null.
struct RowState {
  const float* V = nullptr;
  const float* gs = nullptr;
  const float* grad_c = nullptr;
  float* kept = nullptr;
};

// W[i] as copied (all capsules, [N_out, D_out, D_in]) rewritten as the B operands: lane
// (g, t) of column tile ct holds W[i, j, d, t] and W[i, j, d, t + 4], d = 8 (ct % DT8) + g,
// split into TF32 parts, zeros past D_out and D_in, and for the column tiles past N_out up to
// kRowCols (a warp walks its tiles in fours, with one test per four).
template <int DT8, typename scalar_t>
__device__ __forceinline__ void build_row_operands(const scalar_t* raw, const Dims& n, uint4* Wf) {
  constexpr bool kExact = !std::is_same<scalar_t, float>::value;
  const int D_in = static_cast<int>(n.D_in), D_out = static_cast<int>(n.D_out);
  const int cols = static_cast<int>(n.N_out) * DT8;
  for (int e = threadIdx.x; e < kRowCols<DT8> * 32; e += blockDim.x) {
    const int lane = e & 31, ct = e >> 5, g = lane >> 2, t = lane & 3;
    const int d = (ct % DT8) * 8 + g;
    const scalar_t* w = raw + ((ct / DT8) * D_out + d) * D_in;
    auto at = [&](int k) {
      return ct < cols && d < D_out && k < D_in ? Scalar<scalar_t>::load(w + k) : 0.f;
    };
    uint32_t hi[2], lo[2] = {0, 0};
    split_tf32<kExact>(at(t), hi[0], lo[0]);
    split_tf32<kExact>(at(t + 4), hi[1], lo[1]);
    Wf[e] = uint4{hi[0], hi[1], lo[0], lo[1]};
  }
}

// The product of a column tile for the warp's 16 batch elements (A: u, split) from zero;
// B: the lane's W operands, as build_row_operands lays them out.
template <bool kExact>
__device__ __forceinline__ void row_product(const uint4& w, const uint32_t (&a_hi)[4],
                                            const uint32_t (&a_lo)[4], float (&x)[4]) {
  const uint32_t b_hi[2] = {w.x, w.y}, b_lo[2] = {w.z, w.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) x[q] = 0.f;
  mma_split<kExact>(x, a_hi, a_lo, b_hi, b_lo);
}

// Where lane (g, t)'s W operands of a column tile are in W[i] when the lanes read them
// themselves (row_pass_kernel's kDirect): W[i, j, d, t] and W[i, j, d, t + 4] with
// d = 8 dt + g for the tile's block dt of 8 output dims, at off0[dt] and off1[dt] from
// capsule j's weights; in0 / in1: whether those are inside D_out and D_in. Outside, the
// offsets are 0 (a real element, read and then replaced by zero): every lane loads, with no
// branch, so that the compiler may issue a capsule's loads ahead of its products.
template <int DT8>
struct RowLaneWeights {
  int off0[DT8], off1[DT8];
  bool in0[DT8], in1[DT8];
};
template <int DT8>
__device__ __forceinline__ RowLaneWeights<DT8> row_lane_weights(const Dims& n, int g, int t) {
  RowLaneWeights<DT8> x;
#pragma unroll
  for (int dt = 0; dt < DT8; ++dt) {
    const int d = 8 * dt + g;
    x.in0[dt] = d < n.D_out && t < n.D_in;
    x.in1[dt] = d < n.D_out && t + 4 < n.D_in;
    x.off0[dt] = x.in0[dt] ? d * static_cast<int>(n.D_in) + t : 0;
    x.off1[dt] = x.in1[dt] ? d * static_cast<int>(n.D_in) + t + 4 : 0;
  }
  return x;
}
// The lane's two weights of a column tile of block dt of the capsule whose weights ([D_out,
// D_in] of one W[i, j]) start `cap0` elements after w, read through L1 (where the block's
// other pairs find them) by the read-only path; the offsets are 32-bit from a pointer made
// once a capsule (one IMAD.WIDE an address). row_operands_direct: them as the operands that
// build_row_operands makes, split into TF32 parts (zeros outside D_out and D_in).
template <typename scalar_t>
struct RowWeights {
  scalar_t w0, w1;
};
template <int DT8, typename scalar_t>
__device__ __forceinline__ RowWeights<scalar_t> row_weights_direct(const scalar_t* w, int cap0,
                                                                   const RowLaneWeights<DT8>& x,
                                                                   int dt) {
  return {__ldg(w + (cap0 + x.off0[dt])), __ldg(w + (cap0 + x.off1[dt]))};
}
template <int DT8, typename scalar_t>
__device__ __forceinline__ uint4 row_operands_direct(const RowWeights<scalar_t>& r,
                                                     const RowLaneWeights<DT8>& x, int dt) {
  constexpr bool kExact = !std::is_same<scalar_t, float>::value;
  uint32_t hi[2], lo[2] = {0, 0};
  split_tf32<kExact>(x.in0[dt] ? Scalar<scalar_t>::load(&r.w0) : 0.f, hi[0], lo[0]);
  split_tf32<kExact>(x.in1[dt] ? Scalar<scalar_t>::load(&r.w1) : 0.f, hi[1], lo[1]);
  return uint4{hi[0], hi[1], lo[0], lo[1]};
}

// The inverse of scatter_stage: lanes `o` apart swap their halves, which x[0 .. N) holds, so
// that both hold the pair in x[0 .. 2N), the lower half first.
template <int N, typename T, int P>
__device__ __forceinline__ void gather_stage(T (&x)[P], bool upper, int o) {
#pragma unroll
  for (int v = 0; v < N; ++v) {
    const T mine = x[v], theirs = __shfl_xor_sync(0xffffffffu, mine, o);
    x[v] = upper ? theirs : mine;
    x[v + N] = upper ? mine : theirs;
  }
}

// One pass over a chunk of input capsules for the block's batch elements (kPass):
//   kFirst: the forward's t = 1, every coupling 1 / N_out (or 1 / (N_out + 1), leaky), so
//     the pass sums the predictions and scales the sums once;
//   kForward: t >= 2, logits <u_hat, V>, softmax, partial[chunk] = sum_i c_ij u_hat_ij;
//   kGradient: the backward's t >= 2, also dL/dc = <u_hat, gs> (+ grad_c) and through the
//     softmax the logit gradient g, partial[chunk] = sum_i g_ij u_hat_ij (the term G);
//     c and g kept for the last pass where st.kept is given.
// The partial sums as routing_pass_kernel writes them (kCluster: one per cluster of n.cluster
// blocks along N_in, added up on chip; a template parameter so that the kernels without
// clusters keep their code); c written when c_out != null.
// grid = (n_chunks, ceil(B / (16 * row_tiles))); 2 * row_tiles warps.
//
// W[i]'s operands: staged (kDirect false), the block copies W[i + 1] into shared memory
// while it works on W[i], and rewrites it as operands (build_row_operands) between two
// barriers, so that all 8 warps go in lockstep, three block barriers per capsule with the
// pairs' exchange. kDirect: each lane reads its operands from W[i] in global memory and
// splits them itself (row_operands_direct; the block's 4 pairs read the same lines, so all
// but the first find them in L1, which a prefetch a capsule ahead fills); in the forward at
// t >= 2 once a capsule, parked in the warp's own shared memory for the logits and the sums.
// Then the only barrier in the walk is the pair's own exchange (pair_barrier), and a pair's
// two warps go at their own pace, as the others do. The question kDirect asks on a GPU is
// whether that freedom is worth the instructions it adds: ~10% at t >= 2 and in the
// gradient pass, ~17% fewer at t = 1 (benchmarks/RESULTS.md; not yet measured).
template <Pass kPass, int DT8, typename scalar_t, bool kDirect, bool kCluster>
__global__ void __launch_bounds__(kThreads, kPassBlocksPerSM)
row_pass_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ W, Dims n,
                RowState st, float* __restrict__ partial, scalar_t* __restrict__ c_out) {
  constexpr bool kExact = !std::is_same<scalar_t, float>::value;
  constexpr bool kFirst = kPass == Pass::kFirst, kGrad = kPass == Pass::kGradient;
  constexpr int kTiles = row_pass_tiles<kPass>();  // V, gs
  // The warp's capsules and their column tiles: half of the widest layer's.
  constexpr int kMine = kRowCols<DT8> / DT8 / 2, kMineCols = kMine * DT8;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row_tiles = blockDim.x / 64, half = warp & 1;
  const int64_t tile = int64_t(blockIdx.y) * row_tiles + (warp >> 1);  // the warp's row tile
  const int64_t b0 = tile * kRowsB;
  const bool has_rows = b0 < n.B;  // warp-uniform; idle warps still join the barriers
  const int cols = static_cast<int>(n.N_out) * DT8;
  const int j_base = half * kMine, ct_base = half * kMineCols;
  const int64_t i_begin = int64_t(blockIdx.x) * n.i_per_block;
  const int64_t i_end = min(i_begin + n.i_per_block, n.N_in);

  unsigned char* smem = dynamic_smem<unsigned char>();
  const RowLayout layout = row_layout<kPass, scalar_t>(n, row_tiles, kDirect);
  scalar_t* raw = reinterpret_cast<scalar_t*>(smem + layout.w);
  const uint4* Wf = reinterpret_cast<const uint4*>(smem + layout.wf);
  // The warp's row tile of V, and of gs one array on.
  constexpr int kRowTile = kRowCols<DT8> * kTileElems;
  const int tile_elems = row_tiles * kRowTile;
  const float* Vs = reinterpret_cast<const float*>(smem) + (warp >> 1) * kRowTile;
  // The pair's softmax statistics, [warp][16 rows][kRowStats]: each warp writes its own and
  // reads the other's. kDirect: two sets, for even and odd capsules, since a warp may write
  // the next capsule's before the other has read this one's (the pair barrier of the next
  // capsule keeps it from the one after).
  float* stats = reinterpret_cast<float*>(smem + layout.stats);
  const RowLaneWeights<DT8> lw = row_lane_weights<DT8>(n, g, t);
  const int cap = static_cast<int>(n.D_out * n.D_in);  // one capsule's weights
  // kDirect: the warp's capsules' weights in W[i], how many of them there are, and the last
  // one's index (the column tiles a warp walks past N_out, in fours, read the last capsule's
  // weights: their values go into no result).
  const int mine_caps = max(0, min(kMine, static_cast<int>(n.N_out) - j_base));
  const int64_t mine_elems = int64_t(mine_caps) * cap;
  const int last_mine = max(mine_caps - 1, 0);
  auto mine_weights = [&](int64_t i) { return W + (i * n.N_out + j_base) * cap; };

  // W[i_begin], and the block's row tiles of V (and gs): each tile's cols column tiles
  // (contiguous in the row layout), then zeros up to kRowCols, so that the column tiles that a
  // warp walks past N_out (in fours) read zeros of their own.
  if (!kDirect && i_begin < i_end) copy_weight(n, W + i_begin * n.J * n.D_in, n.J * n.D_in, raw);
  {
    const int64_t block_tile = int64_t(blockIdx.y) * row_tiles;
    const int tiles =
        static_cast<int>(min(int64_t(row_tiles), (n.B + kRowsB - 1) / kRowsB - block_tile));
    const int per_tile = cols * kTileElems / 4;  // 16-byte pieces of a row tile
#pragma unroll
    for (int k = 0; k < kTiles; ++k) {
      const float* from = (k == 0 ? st.V : st.gs) + block_tile * cols * kTileElems;
      float* to = reinterpret_cast<float*>(smem) + k * tile_elems;
      for (int x = threadIdx.x; x < tiles * per_tile; x += blockDim.x)
        cp_async16(to + (x / per_tile) * kRowTile + 4 * (x % per_tile), from + 4 * int64_t(x));
      for (int x = threadIdx.x; x < tiles * (kRowTile / 4 - per_tile); x += blockDim.x) {
        const int r = x / (kRowTile / 4 - per_tile), y = x % (kRowTile / 4 - per_tile);
        reinterpret_cast<float4*>(to + r * kRowTile)[per_tile + y] = float4{0.f, 0.f, 0.f, 0.f};
      }
    }
  }
  cp_async_commit();
  if (kDirect && kTiles > 0) {  // V (and gs) landed: the walk has no block barrier to wait at
    cp_async_wait_all();
    __syncthreads();
  }

  // u[b, i, k] of the lane's A slots: rows g, g + 8 (slots 0, 1; 2, 3), dims t, t + 4.
  auto load_u = [&](int64_t i, float (&x)[4]) {
#pragma unroll
    for (int s = 0; s < 4; ++s) x[s] = u_at(u, n, b0 + g + 8 * (s & 1), i, t + 4 * (s >> 1));
  };
  float u_next[4];
  if (has_rows && i_begin < i_end) load_u(i_begin, u_next);

  float acc[kMineCols][4];
#pragma unroll
  for (int k = 0; k < kMineCols; ++k)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[k][q] = 0.f;
  const float uniform = uniform_coupling<float>(n);
  const int row = g + 8 * (t >> 1);  // the batch row of the lane's values after the scatter
  const int64_t b = b0 + row;

  // The lane's operands of the warp's column tile k of capsule i: staged by the block, or
  // (kDirect) read by the lane, once a capsule into the warp's own slots where the pass has
  // room for them (kPark: the forward at t >= 2 uses each twice), else at each use.
  constexpr bool kPark = row_pass_parks<kPass>(kDirect);
  uint4* parked = reinterpret_cast<uint4*>(smem + layout.wf) + warp * kMineCols * 32;
  const scalar_t* w_i = W;  // kDirect: mine_weights(i) of the capsule at hand
  auto direct_weights = [&](int k) {
    return row_weights_direct<DT8>(w_i, min(k / DT8, last_mine) * cap, lw, k % DT8);
  };
  auto direct_operands = [&](int k) {
    return row_operands_direct<DT8>(direct_weights(k), lw, k % DT8);
  };
  auto operands = [&](int k) {
    if (kPark) return parked[k * 32 + lane];
    if (kDirect) return direct_operands(k);
    return Wf[(ct_base + k) * 32 + lane];
  };

  for (int64_t i = i_begin; i < i_end; ++i) {
    if (kDirect) {
      if (!has_rows) break;  // the pair has no rows: nobody waits for it
      w_i = opaque(mine_weights(i));  // a pointer in registers, the offsets 32-bit
      // The warp's next capsules' lines, 128 bytes a lane: they are at most 20 lines (5
      // capsules of 16 x 8 floats, or 8 of 8 x 8: row_pass_supported).
      constexpr int kLine = 128 / sizeof(scalar_t);
      if (i + 1 < i_end && lane * kLine < mine_elems)
        prefetch_l1(mine_weights(i + 1) + lane * kLine);
      if (kPark) {
        // All loads first, so that they are in flight together; then the operands, which
        // each lane reads back itself (no synchronisation needed).
        RowWeights<scalar_t> r[kMineCols];
#pragma unroll
        for (int k = 0; k < kMineCols; ++k) {
          if (k % 4 == 0 && ct_base + k >= cols) break;  // warp-uniform; in fours as below
          r[k] = direct_weights(k);
        }
#pragma unroll
        for (int k = 0; k < kMineCols; ++k) {
          if (k % 4 == 0 && ct_base + k >= cols) break;
          parked[k * 32 + lane] = row_operands_direct<DT8>(r[k], lw, k % DT8);
        }
      }
    } else {
      // W[i] (and at first V) has landed, and no warp reads the previous operands any more:
      // rewrite W[i] as operands, then (second barrier) fetch W[i + 1] into the same buffer.
      cp_async_wait_all();
      __syncthreads();
      build_row_operands<DT8>(raw, n, reinterpret_cast<uint4*>(smem + layout.wf));
      __syncthreads();
      if (i + 1 < i_end) copy_weight(n, W + (i + 1) * n.J * n.D_in, n.J * n.D_in, raw);
      cp_async_commit();
    }
    // c[h * kMine + v]: the coupling (the logit gradient in the gradient pass) of batch row
    // g + 8h and capsule j_base + v. After the scatter over the lanes t (and until the
    // gather), lanes t and t ^ 1 hold row `row`'s in c[v], v < kMine; so does dc, dL/dc.
    // mx, l, ed: the warp's softmax statistics of the row (see below).
    uint32_t a_hi[4], a_lo[4] = {0, 0, 0, 0};
    float c[2 * kMine], dc[kGrad ? 2 * kMine : 1];
    float mx = -INFINITY, l = 0.f, ed = 0.f;
    if (has_rows) {
#pragma unroll
      for (int s = 0; s < 4; ++s) split_tf32<kExact>(u_next[s], a_hi[s], a_lo[s]);
      if (i + 1 < i_end) load_u(i + 1, u_next);
      if (kFirst) {
#pragma unroll
        for (int v = 0; v < kMine; ++v) c[v] = uniform;
      } else {
        // The logits (and dL/dc) of the warp's capsules: each lane's share of the dot products
        // over its dims, summed over the 4 lanes t. Column tiles in fours: those past N_out
        // have zero operands (build_row_operands) and zero V and gs, and their capsules'
        // values are not used.
#pragma unroll
        for (int v = 0; v < 2 * kMine; ++v) {
          c[v] = 0.f;
          if (kGrad) dc[v] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < kMineCols; ++k) {
          const int ct = ct_base + k;
          if (k % 4 == 0 && ct >= cols) break;  // warp-uniform
          float x[4];
          row_product<kExact>(operands(k), a_hi, a_lo, x);
          // (one FFMA per value: as a sum of two products the compiler added an FMUL and FADD)
          const float4 v = reinterpret_cast<const float4*>(Vs)[ct * 32 + lane];
          c[k / DT8] = fmaf(x[1], v.y, fmaf(x[0], v.x, c[k / DT8]));
          c[kMine + k / DT8] = fmaf(x[3], v.w, fmaf(x[2], v.z, c[kMine + k / DT8]));
          if (kGrad) {
            const float4 s = reinterpret_cast<const float4*>(Vs + tile_elems)[ct * 32 + lane];
            dc[k / DT8] = fmaf(x[1], s.y, fmaf(x[0], s.x, dc[k / DT8]));
            dc[kMine + k / DT8] = fmaf(x[3], s.w, fmaf(x[2], s.z, dc[kMine + k / DT8]));
          }
        }
        scatter_stage<kMine>(c, (t & 2) != 0, 2);
#pragma unroll
        for (int v = 0; v < kMine; ++v) c[v] += __shfl_xor_sync(0xffffffffu, c[v], 1);
        if (kGrad) {
          scatter_stage<kMine>(dc, (t & 2) != 0, 2);
#pragma unroll
          for (int v = 0; v < kMine; ++v) {
            dc[v] += __shfl_xor_sync(0xffffffffu, dc[v], 1);
            const int j = j_base + v;
            if (st.grad_c != nullptr && b < n.B && j < n.N_out)
              dc[v] += st.grad_c[coupling_row(n, b, i) + j];
          }
        }
        // The softmax over all capsules: this warp's maximum, sum of exponentials e and (in
        // the gradient pass) sum of e dL/dc for the row, merged with the other warp's in warp
        // order (both get the same bits) and with the extra logit 0 of leaky routing.
#pragma unroll
        for (int v = 0; v < kMine; ++v)
          if (j_base + v < n.N_out) mx = fmax(mx, c[v]);
#pragma unroll
        for (int v = 0; v < kMine; ++v) {
          c[v] = j_base + v < n.N_out ? exp_(c[v] - mx) : 0.f;
          l += c[v];
          if (kGrad) ed += c[v] * dc[v];
        }
        float* mine = stats + (kDirect ? (i & 1) * row_stats_elems(row_tiles) : 0) +
                      (warp * kRowsB + row) * kRowStats;
        if ((t & 1) == 0) {
          mine[0] = mx;
          mine[1] = l;
          if (kGrad) mine[2] = ed;
        }
      }
    }
    // Every warp, idle ones too, meets the others here: the pairs' statistics are written.
    // kDirect: only the pair meets (idle pairs left the walk).
    if (!kFirst) {
      if (kDirect)
        pair_barrier(1 + (warp >> 1));
      else
        __syncthreads();
    }
    if (!has_rows) continue;
    if (!kFirst) {
      const float* other = stats + (kDirect ? (i & 1) * row_stats_elems(row_tiles) : 0) +
                           ((warp ^ 1) * kRowsB + row) * kRowStats;
      const float m_other = other[0], l_other = other[1], ed_other = kGrad ? other[2] : 0.f;
      const float m0 = half ? m_other : mx, m1 = half ? mx : m_other;
      const float M = fmax(fmax(m0, m1), n.leaky ? 0.f : -INFINITY);
      const float s_own = l == 0.f ? 0.f : exp_(mx - M);
      const float s_other = l_other == 0.f ? 0.f : exp_(m_other - M);
      const float s0 = half ? s_other : s_own, s1 = half ? s_own : s_other;
      const float l0 = half ? l_other : l, l1 = half ? l : l_other;
      const float L = l0 * s0 + l1 * s1 + (n.leaky ? exp_(-M) : 0.f);
      const float scale = s_own / L;
#pragma unroll
      for (int v = 0; v < kMine; ++v) c[v] *= scale;
      if (kGrad) {
        // Back through the softmax: g = c (dL/dc - sum_k c_k dL/dc_k), the sum over all
        // capsules k (leaky routing's extra one has no dL/dc).
        const float ed0 = half ? ed_other : ed, ed1 = half ? ed : ed_other;
        const float cg = (ed0 * s0 + ed1 * s1) / L;
        // c and g of (b, i, j) for the last pass, zeros past B up to whole batch tiles.
        const int64_t rows = kept_batch(n);
        const bool keep = st.kept != nullptr && (t & 1) == 0 && b < rows;
#pragma unroll
        for (int v = 0; v < kMine; ++v) {
          const float gv = c[v] * (dc[v] - cg);
          const int j = j_base + v;
          if (keep && j < n.N_out) {
            float* kc = st.kept + kept_index(n, i, j, b);
            kc[0] = b < n.B ? c[v] : 0.f;
            kc[kept_plane(n)] = b < n.B ? gv : 0.f;
          }
          c[v] = gv;
        }
      }
    }
    // c[b, i, j] of the warp's capsules, from lanes t = 0, 2.
    if (!kGrad && c_out != nullptr && (t & 1) == 0) {
#pragma unroll
      for (int v = 0; v < kMine; ++v) {
        const int j = j_base + v;
        if (b < n.B && j < n.N_out)
          c_out[coupling_row(n, b, i) + j] = Scalar<scalar_t>::store(c[v]);
      }
    }
    if (!kFirst) gather_stage<kMine>(c, (t & 2) != 0, 2);
    // The sums of the warp's column tiles (at t = 1 of the predictions alone).
#pragma unroll
    for (int k = 0; k < kMineCols; ++k) {
      if (k % 4 == 0 && ct_base + k >= cols) break;  // warp-uniform; in fours as above
      float x[4];
      row_product<kExact>(operands(k), a_hi, a_lo, x);
      if (kFirst) {
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[k][q] += x[q];
      } else {
        const float c0 = c[k / DT8], c1 = c[kMine + k / DT8];
        acc[k][0] += c0 * x[0];
        acc[k][1] += c0 * x[1];
        acc[k][2] += c1 * x[2];
        acc[k][3] += c1 * x[3];
      }
    }
  }

  // The block's partial sum over its capsules: lane (g, t)'s values x of column tile ct for
  // the row tile from batch element row0 (fragment slots as V's, see row_layout_offset) into
  // partial sum `sum`. Without clusters each warp writes its own; with clusters the blocks
  // put theirs in shared memory (idle warps zeros), and each block adds up a slice of them
  // over the cluster's blocks in rank order (deterministic) and writes it, one partial sum
  // per cluster: a cluster of 8 writes an eighth of the bytes that finish_iteration (or
  // sweep_step) reads back.
  const float scale = kFirst ? uniform : 1.f;
  auto store = [&](int64_t sum, int64_t row0, int ct, int lane_, const float (&x)[4]) {
    const int64_t j = ct / DT8;
    const int g_ = lane_ >> 2, t_ = lane_ & 3;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t bq = row0 + g_ + 8 * (q >> 1);
      const int d = (ct % DT8) * 8 + 2 * t_ + (q & 1);
      if (bq < n.B && d < n.D_out) partial[(sum * n.B + bq) * n.J + j * n.D_out + d] = x[q];
    }
  };
  if constexpr (kCluster) {
    float4* sums = dynamic_smem<float4>();  // [warp][kMineCols][32 lanes]
    // The walk's shared memory is free once every copy into it has landed: a block with no
    // input capsules (past N_in, in the last cluster) skipped the walk, where the copies of V
    // (and gs) are waited for, and the sums go where those copies go.
    cp_async_wait_all();
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kMineCols; ++k) {
      const bool mine = has_rows && ct_base + k < cols;
      sums[(warp * kMineCols + k) * 32 + lane] =
          mine ? float4{scale * acc[k][0], scale * acc[k][1], scale * acc[k][2], scale * acc[k][3]}
               : float4{0.f, 0.f, 0.f, 0.f};
    }
    cluster_sync();
    const int total = (blockDim.x >> 5) * kMineCols * 32, per = (total + n.cluster - 1) / n.cluster;
    const int rank = cluster_rank(), end = min(total, (rank + 1) * per);
    for (int e = rank * per + threadIdx.x; e < end; e += blockDim.x) {
      const int w = e / (kMineCols * 32), k = (e >> 5) % kMineCols;
      const int ct = (w & 1) * kMineCols + k;
      if (ct >= cols) continue;
      float4 x = cluster_shared<float4>(sums, 0)[e];
      for (int r = 1; r < n.cluster; ++r) {
        const float4 y = cluster_shared<float4>(sums, r)[e];
        x.x += y.x;
        x.y += y.y;
        x.z += y.z;
        x.w += y.w;
      }
      const float v[4] = {x.x, x.y, x.z, x.w};
      store(blockIdx.x / n.cluster, (int64_t(blockIdx.y) * row_tiles + (w >> 1)) * kRowsB, ct,
            e & 31, v);
    }
    cluster_sync();  // the cluster's sums are read: the blocks may leave
    return;
  }
  if (!has_rows) return;
#pragma unroll
  for (int k = 0; k < kMineCols; ++k) {
    if (ct_base + k >= cols) break;
    const float v[4] = {scale * acc[k][0], scale * acc[k][1], scale * acc[k][2], scale * acc[k][3]};
    store(blockIdx.x, b0, ct_base + k, lane, v);
  }
}

// --- the first iteration's sums as one matrix product ----------------------------------
//
// At t = 1 every coupling is uniform_coupling(n), so s^(1)[b, n] (n = j D_out + d) is that
// times sum_(i, k) u[b, i, k] W[i, j, d, k]: one matrix product of u, read as the [B, N_in D_in]
// matrix it is in memory, by W read as [N_in D_in, N_out D_out] (8 input dims of W[i, j, d]
// are 32 contiguous bytes in float32). first_sums_kernel makes it split along N_in D_in:
// block (p, mb, nb) adds up the input capsules of chunk p for kFirstRows batch elements and
// kFirstCols columns, and writes them as partial sum p, which finish_iteration adds in order
// with the other chunks'. Each of the 8 warps owns 32 x 40 of them (2 x 5 m16n8 products), its
// operands read from two shared-memory buffers that cp.async fills kFirstK input dims at a
// time. Per 8 input dims a warp issues the same 30 products (3xTF32) as row_pass_kernel's
// t = 1 pass issues per capsule, in 196 instructions where that pass issues ~455 (SASS,
// float32): no rewrite of W[i] into operands, two block barriers per 4 capsules instead of
// two per capsule. Needs D_in % 8 == 0 and 16-byte aligned u and W (Dims::rows8): then each
// 8 input dims belong to one capsule and copy in 16-byte pieces.
constexpr int kFirstRows = 64;                  // batch elements per block
constexpr int kFirstCols = 160;                 // columns (n) per block
constexpr int kFirstK = 32;                     // input dims per staged buffer
constexpr int kFirstWarpCols = kFirstCols / 4;  // 40: 5 products of 8 columns

// Elements per staged row: kFirstK, padded to keep rows 16-byte aligned and make a warp's
// fragment loads (lane (g, t) reads row g, element t) fall in distinct banks (float32: rows 36
// words apart, banks 4g + t; 16-bit types: 20 words apart, two lanes per word).
template <typename T>
__host__ __device__ constexpr int first_stride() {
  return kFirstK + 16 / static_cast<int>(sizeof(T));
}

// One buffer: the rows of u, [kFirstRows][first_stride], then the columns of W,
// [kFirstCols][first_stride]; the kernel has two.
template <typename T>
__host__ __device__ constexpr size_t first_buffer_bytes() {
  return size_t(kFirstRows + kFirstCols) * first_stride<T>() * sizeof(T);
}

// partial[p, b, n] = uniform_coupling(n) * sum of u[b, i, :] . W[i, j, d, :] over the input
// capsules i of chunk p (blockIdx.x; n.i_per_block each), for the block's kFirstRows batch
// elements (blockIdx.y) and kFirstCols columns (blockIdx.z).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kPassBlocksPerSM)
first_sums_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ W, Dims n,
                  float* __restrict__ partial) {
  constexpr bool kExact = !std::is_same<scalar_t, float>::value;
  constexpr int S = first_stride<scalar_t>();
  constexpr int kPiece = 16 / sizeof(scalar_t);  // elements of a 16-byte copy
  constexpr int kPieces = kFirstK / kPiece;      // copies per staged row
  static_assert(kThreads % kPieces == 0, "each thread copies the same piece of its rows");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wm = warp & 1, wn = warp >> 1;  // the warp's rows 32 wm .., columns 40 wn ..
  const int64_t b0 = int64_t(blockIdx.y) * kFirstRows, n0 = int64_t(blockIdx.z) * kFirstCols;
  const int64_t K = n.N_in * n.D_in;  // u's row length
  const int64_t k_begin = int64_t(blockIdx.x) * n.i_per_block * n.D_in;
  const int64_t k_end = min(k_begin + int64_t(n.i_per_block) * n.D_in, K);
  scalar_t* const smem = dynamic_smem<scalar_t>();
  auto rows_of = [&](int x) { return smem + x * (kFirstRows + kFirstCols) * S; };  // u's
  auto cols_of = [&](int x) { return rows_of(x) + kFirstRows * S; };              // W's

  // Rows past B and columns past J are never copied: zeros in both buffers, once.
  for (int e = threadIdx.x; e < 2 * (kFirstRows + kFirstCols); e += blockDim.x) {
    const int x = e / (kFirstRows + kFirstCols), r = e % (kFirstRows + kFirstCols);
    const bool outside = r < kFirstRows ? b0 + r >= n.B : n0 + (r - kFirstRows) >= n.J;
    if (outside)
      for (int k = 0; k < kFirstK; ++k) rows_of(x)[r * S + k] = Scalar<scalar_t>::store(0.f);
  }

  // The thread copies piece q of rows (and columns) first, first + step, ...: u[b, k0 + kq ..]
  // and W[i, n, k ..] for the input dim k0 + kq = i D_in + k, which it follows from chunk
  // to chunk.
  const int q = threadIdx.x % kPieces, first = threadIdx.x / kPieces, step = kThreads / kPieces;
  const int kq = q * kPiece;
  int64_t wi = (k_begin + kq) / n.D_in;
  int wk = static_cast<int>((k_begin + kq) - wi * n.D_in);
  auto stage = [&](int64_t k0, int x) {
    if (k0 + kq < k_end) {  // (k_end - k0 is a multiple of 8, a piece at most 8 elements)
      const scalar_t* from = u + b0 * K + k0 + kq;
      scalar_t* to = rows_of(x) + kq;
      for (int r = first; r < kFirstRows; r += step)
        if (b0 + r < n.B) cp_async16(to + r * S, from + r * K);
      const scalar_t* w = W + (wi * n.J + n0) * n.D_in + wk;
      scalar_t* wto = cols_of(x) + kq;
      for (int c = first; c < kFirstCols; c += step)
        if (n0 + c < n.J) cp_async16(wto + c * S, w + c * n.D_in);
    }
    for (wk += kFirstK; wk >= n.D_in; wk -= static_cast<int>(n.D_in)) ++wi;  // the next chunk's
  };

  float acc[2][5][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 5; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
  // Warp-uniform: how many of the warp's products have rows below B (m_tiles of 2) and
  // columns below J (n_tiles of 5); a warp with none only stages and waits.
  const int64_t rows_left = n.B - b0 - 32 * wm, cols_left = n.J - n0 - kFirstWarpCols * wn;
  const int m_tiles =
      rows_left <= 0 ? 0 : rows_left >= 32 ? 2 : static_cast<int>((rows_left + 15) / 16);
  const int n_tiles =
      cols_left <= 0 ? 0 : cols_left >= 40 ? 5 : static_cast<int>((cols_left + 7) / 8);

  stage(k_begin, 0);
  cp_async_commit();
  int x = 0;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kFirstK, x ^= 1) {
    if (k0 + kFirstK < k_end) stage(k0 + kFirstK, x ^ 1);
    cp_async_commit();
    cp_async_wait_one();  // this chunk's copies have landed (the next chunk's may not)
    __syncthreads();
    const scalar_t* a = rows_of(x) + (32 * wm + g) * S + t;
    const scalar_t* bw = cols_of(x) + (kFirstWarpCols * wn + g) * S + t;
    const int steps = m_tiles > 0 && n_tiles > 0
                          ? static_cast<int>(min(int64_t(kFirstK), k_end - k0)) / 8
                          : 0;
    for (int s8 = 0; s8 < steps; ++s8) {
      uint32_t a_hi[2][4], a_lo[2][4] = {};
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const scalar_t* p = a + (16 * mt + 8 * (e & 1)) * S + 4 * (e >> 1) + 8 * s8;
          split_tf32<kExact>(Scalar<scalar_t>::load(p), a_hi[mt][e], a_lo[mt][e]);
        }
#pragma unroll
      for (int nt = 0; nt < 5; ++nt) {
        if (nt >= n_tiles) break;  // warp-uniform
        uint32_t b_hi[2], b_lo[2] = {};
#pragma unroll
        for (int e = 0; e < 2; ++e)
          split_tf32<kExact>(Scalar<scalar_t>::load(bw + 8 * nt * S + 4 * e + 8 * s8), b_hi[e],
                             b_lo[e]);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          if (mt < m_tiles) mma_split_add<kExact>(acc[mt][nt], a_hi[mt], a_lo[mt], b_hi, b_lo);
      }
    }
    __syncthreads();  // every warp is done with buffer x before it is staged again
  }

  // The lane's values: rows 16 mt + g (+ 8), columns 8 nt + 2 t (+ 1) of the warp's.
  const float uniform = uniform_coupling<float>(n);
  float* out = partial + int64_t(blockIdx.x) * n.B * n.J;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 5; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t b = b0 + 32 * wm + 16 * mt + g + 8 * (e >> 1);
        const int64_t c = n0 + kFirstWarpCols * wn + 8 * nt + 2 * t + (e & 1);
        if (b < n.B && c < n.J) out[b * n.J + c] = uniform * acc[mt][nt][e];
      }
}

// --- per-(b, j) kernels: one warp per output capsule (D_out <= 32) -----------------------

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// VW consecutive values of the accumulation type: one 16-byte load where VW * sizeof(T) = 16.
template <typename T, int VW>
struct alignas(sizeof(T) * VW) Vec {
  T v[VW];
};
// Values per lane of the per-capsule kernels: a 16-byte vector where D_out is a multiple of
// it (then every lane's first dim, and the partial sums' strides, are whole vectors), else 1.
template <typename acc_t>
constexpr int kCapsuleVec = 16 / sizeof(acc_t);

// A lane holds VW consecutive dims d .. d + VW - 1 of the warp's capsule (b, j).
template <int VW>
struct CapsuleLane {
  int64_t b, j, e;  // e: offset of (b, j, d) in a [B, N_out, D_out] array
  // The warp holds `32 / span` copies of the capsule's dims, span = ceil(D_out / VW) rounded
  // up to a power of two: lane = part * span + d / VW. The copies share the sum over the
  // blocks' partials (sum_partials); part 0 owns (b, j, d ..) for everything else.
  int span, part, d;
  bool has_dim;     // d < D_out (any copy; with VW > 1 all VW dims, D_out % VW == 0)
  bool valid;       // d < D_out and part == 0
  bool active;      // the warp has a capsule
  __device__ CapsuleLane(const Dims& n) {
    const int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const int lanes = static_cast<int>((n.D_out + VW - 1) / VW);
    span = 1;
    while (span < lanes) span <<= 1;
    d = (lane & (span - 1)) * VW;
    part = lane / span;
    active = w < n.B * n.N_out;
    b = w / n.N_out;
    j = w % n.N_out;
    has_dim = active && d < n.D_out;
    valid = has_dim && part == 0;
    e = (b * n.N_out + j) * n.D_out + d;
  }
  // (b, j, d + v) in a tiled array (V, V_prev, gs: tiled_offset) and in the row layout
  // (row_layout_offset).
  __device__ int64_t tiled(const Dims& n, int v) const { return tiled_offset(n, b, j, d + v); }
  __device__ int64_t rows(const Dims& n, int v) const { return row_layout_offset(n, b, j, d + v); }
};

// p[0] + p[stride] + ... + p[(count - 1) * stride] for each of the lane's VW values, the
// blocks' partial sums of (b, j, d ..), in a fixed order (deterministic) and left in every
// copy of d (every lane of the warp must call it): each copy sums its share of the blocks in
// eight interleaved running sums (16 vector loads in flight), then the copies are added
// pairwise (each side adds the same two values, so that all end with the same bits).
// The MNIST layer at B = 128 (128 partials, D_out = 16): 8 copies of 4 lanes, 16 partials
// each, all of them in flight at once. With 4-byte loads, 2 copies of 16 lanes needed 4 L2
// round trips of 16 loads (finish_iteration_kernel: 6.7 us per call on the H100); with one
// copy and four sums, 16 (~4 us more).
template <int VW, typename acc_t>
__device__ __forceinline__ void sum_partials(const CapsuleLane<VW>& c, const acc_t* p, int count,
                                             int64_t stride, acc_t (&x)[VW]) {
  constexpr int kSums = 8;
  using V = Vec<acc_t, VW>;
  acc_t s[kSums][VW];
#pragma unroll
  for (int k = 0; k < kSums; ++k)
#pragma unroll
    for (int v = 0; v < VW; ++v) s[k][v] = acc_t(0);
  if (c.has_dim) {
    const int parts = 32 / c.span;
    const int begin = static_cast<int>(int64_t(count) * c.part / parts);
    const int end = static_cast<int>(int64_t(count) * (c.part + 1) / parts);
    auto add = [&](int k, int ch) {
      const V x = *reinterpret_cast<const V*>(p + ch * stride);
#pragma unroll
      for (int v = 0; v < VW; ++v) s[k][v] += x.v[v];
    };
    int ch = begin;
#pragma unroll 2
    for (; ch + kSums <= end; ch += kSums)
#pragma unroll
      for (int k = 0; k < kSums; ++k) add(k, ch + k);
    for (; ch < end; ++ch) add(0, ch);  // (a constant index: s stays in registers)
  }
#pragma unroll
  for (int v = 0; v < VW; ++v) {
    x[v] = ((s[0][v] + s[1][v]) + (s[2][v] + s[3][v])) +
           ((s[4][v] + s[5][v]) + (s[6][v] + s[7][v]));
    for (int o = c.span; o < 32; o <<= 1) x[v] += __shfl_xor_sync(0xffffffffu, x[v], o);
  }
}

// Forward, after a pass: s = bias + sum of the blocks' partials (in block order);
// v = squash(s); V += v (V = v on the first iteration; V tiled, or in the row layout where
// row_pass_kernel reads it); v written on the last iteration. VW: values per lane (see
// kCapsuleVec).
template <int VW, typename scalar_t>
__global__ void finish_iteration_kernel(Dims n, const typename Scalar<scalar_t>::acc* partial,
                                        const scalar_t* __restrict__ bias, double eps,
                                        bool first, bool row_layout,
                                        typename Scalar<scalar_t>::acc* V,
                                        typename Scalar<scalar_t>::acc* s_out,
                                        scalar_t* __restrict__ v_out) {
  using acc_t = typename Scalar<scalar_t>::acc;
  const CapsuleLane<VW> c(n);
  if (!c.active) return;  // whole warps only
  acc_t s[VW];
  sum_partials(c, partial + c.e, n.partials, n.B * n.J, s);
  acc_t sq = 0;
#pragma unroll
  for (int v = 0; v < VW; ++v) {
    if (!c.valid) s[v] = 0;
    else if (bias != nullptr) s[v] += Scalar<scalar_t>::load(bias + c.j * n.D_out + c.d + v);
    sq += s[v] * s[v];
  }
  const acc_t f = squash_scale(warp_sum(sq), acc_t(eps));
  if (!c.valid) return;
#pragma unroll
  for (int v = 0; v < VW; ++v) {
    s_out[c.e + v] = s[v];
    acc_t& Vt = V[row_layout ? c.rows(n, v) : c.tiled(n, v)];
    Vt = (first ? acc_t(0) : Vt) + f * s[v];
    if (v_out != nullptr) v_out[c.e + v] = Scalar<scalar_t>::store(f * s[v]);
  }
}

// Backward sweep step for iteration t: G += sum of the partials of the pass for t + 1 (if
// any), then gs^(t) = J_squash(s^(t))^T (G + [t == r] grad_v) (gs tiled; and in the row
// layout into gs_rows_t where the gradient passes are row passes, else null). s holds every
// iteration's sums, [r, B, N_out * D_out]; grad_v (the first step's, else null) is in the
// inputs' dtype, widened here.
//
// With V_prev given (the first step, t = r) it also writes the running sums V_prev[t'] =
// v^(1) + ... + v^(t') for t' = 0 .. r-1 (V_prev[0] = 0; v = squash(s), made as
// finish_iteration_kernel made them: the same lanes, the same order of operations), tiled
// (tiled_elems apart), and in the row layout into V_rows (row_layout_elems apart) where the
// gradient passes are row passes, else null. (They had a kernel of their own, one launch more
// per backward.)
template <int VW, typename scalar_t, typename acc_t = typename Scalar<scalar_t>::acc>
__global__ void sweep_step_kernel(Dims n, const acc_t* partial, int n_partials, const acc_t* s,
                                  int t, int iterations, const scalar_t* grad_v, double eps,
                                  acc_t* G, acc_t* gs_t, acc_t* gs_rows_t, acc_t* V_prev,
                                  acc_t* V_rows) {
  const CapsuleLane<VW> c(n);
  if (!c.active) return;
  const int64_t plane = n.B * n.J;  // one iteration of s
  if (V_prev != nullptr) {
    acc_t V[VW];
#pragma unroll
    for (int v = 0; v < VW; ++v) V[v] = acc_t(0);
    for (int tt = 0; tt < iterations; ++tt) {
      if (tt > 0) {
        acc_t st[VW], sq = 0;
#pragma unroll
        for (int v = 0; v < VW; ++v) {
          st[v] = c.valid ? s[(tt - 1) * plane + c.e + v] : acc_t(0);
          sq += st[v] * st[v];
        }
        const acc_t f = squash_scale(warp_sum(sq), acc_t(eps));
#pragma unroll
        for (int v = 0; v < VW; ++v) V[v] += f * st[v];
      }
      if (!c.valid) continue;
#pragma unroll
      for (int v = 0; v < VW; ++v) {
        V_prev[tt * tiled_elems(n) + c.tiled(n, v)] = V[v];
        if (V_rows != nullptr) V_rows[tt * row_layout_elems(n) + c.rows(n, v)] = V[v];
      }
    }
  }
  acc_t sum[VW];
  if (n_partials > 0) {
    sum_partials(c, partial + c.e, n_partials, plane, sum);
  } else {
#pragma unroll
    for (int v = 0; v < VW; ++v) sum[v] = acc_t(0);
  }
  const acc_t* s_t = s + (t - 1) * plane;
  acc_t st[VW], gv[VW], ss = 0, sg = 0;
#pragma unroll
  for (int v = 0; v < VW; ++v) {
    st[v] = gv[v] = acc_t(0);
    if (c.valid) {
      // G starts at zero: the first step (t = r) has no partials and does not read it.
      const acc_t g = n_partials > 0 ? G[c.e + v] + sum[v] : acc_t(0);
      G[c.e + v] = g;
      st[v] = s_t[c.e + v];
      gv[v] = g + (grad_v != nullptr ? Scalar<scalar_t>::load(grad_v + c.e + v) : acc_t(0));
    }
    ss += st[v] * st[v];
    sg += st[v] * gv[v];
  }
  acc_t a, bb;
  squash_vjp_coeffs(warp_sum(ss), warp_sum(sg), acc_t(eps), &a, &bb);
  if (!c.valid) return;
#pragma unroll
  for (int v = 0; v < VW; ++v) {
    gs_t[c.tiled(n, v)] = a * gv[v] + bb * st[v];
    if (gs_rows_t != nullptr) gs_rows_t[c.rows(n, v)] = a * gv[v] + bb * st[v];
  }
}

// --- the last backward pass ------------------------------------------------------------
//
// Local per (b, i): g_uh = sum_t c^(t) gs^(t) + gbeta^(t) V^(t-1), handed to a sink: route
// writes grad_u_hat (route_grad_kernel: a warp owns one input capsule and one group of output
// capsules and walks every batch tile); dynamic_routing contracts it into grad_u (over j, d)
// and grad_W (over b) (weight_grad_kernel, below).

// Warps per block of route_grad_kernel.
template <typename acc_t>
constexpr int final_warps() {
  return sizeof(acc_t) == 8 ? 2 : 4;
}

template <typename acc_t>
struct Sweep {
  const acc_t* V_prev;   // [r, tiled_elems]: V^(t-1) at t-1
  const acc_t* gs;       // [r, tiled_elems]: dL/ds^(t) at t-1
  const acc_t* grad_c;   // [B, N_in, N_out] or null
  int t_min, iterations;
  bool detach;
  // Several groups only: launch_group_stats' outputs for iteration t at t - 1,
  // [r, B, N_in, 2] and [r, B, N_in] (else null).
  const acc_t* stats = nullptr;
  const acc_t* cg = nullptr;
  // c^(t) and the logit gradient of every iteration t >= 2 as the gradient passes computed
  // them, [r - 1, 2, kept_plane] (t at t - 2; see keep_couplings), or null: then the last
  // pass recomputes them (the launch code keeps them where they fit its memory budget;
  // detach never needs them).
  const acc_t* kept = nullptr;
};

// g_uh of the warp's group for (i, b0), its 16 row tiles in the accumulator layout, summed
// over the iterations in registers, recomputing every iteration's couplings (with kept ones,
// the last passes use kept_rows instead). Rows of capsules past N_out are not touched.
// (float32 held g_uh in shared memory, 64 KB a block, while c and g took 64 registers beside
// it; spread over the lanes they take 8. The 64 KB were meant to leave the L1 cache room for
// the V and gs rows that each iteration reads twice, for the agreements and for the rows. On
// the H100 at the 32768 x 64 shape the carveout did shrink to 102 KB, but the L1 hit rate
// stayed at 3.7%: the rows are not reused from L1 (the pass: 35 ms, from 61 at 4abd02d).)
// kPark: the warp's own shared memory, at the lane's slots (2 * kGroupRows row tiles, see
// add_dots), keeps the rows of V^(t-1) and gs^(t) that the dot products read, so that the
// walk that follows reads them from there instead of from L2 a second time: 5 row arrays per
// batch tile from L2 at 3 iterations instead of 9. A lane reads back only what it wrote:
// no barrier.
template <int DT, bool kPark = false, typename Src, typename acc_t>
__device__ __forceinline__ void prediction_grad(const Src& src, const Dims& n, const Lane& L,
                                                const Sweep<acc_t>& sw, int64_t i, int64_t b0,
                                                int grp, acc_t (&g_uh)[kGroupRows][4],
                                                acc_t* park = nullptr) {
  constexpr int GJ = kGroupRows / DT;
  const int64_t stride = tiled_elems(n);
#pragma unroll
  for (int r = 0; r < kGroupRows; ++r) {
    if (!has_capsule(n, grp * GJ + r / DT)) break;  // warp-uniform
#pragma unroll
    for (int q = 0; q < 4; ++q) g_uh[r][q] = acc_t(0);
  }
  for (int t = sw.t_min; t <= sw.iterations; ++t) {
    const int64_t per_t = n.B * n.N_in;
    const State<acc_t> st{sw.V_prev + (t - 1) * stride, sw.gs + (t - 1) * stride,
                          t == sw.iterations ? sw.grad_c : nullptr, t == 1, 0, n.N_out, 0,
                          sw.stats != nullptr ? sw.stats + (t - 1) * per_t * 2 : nullptr,
                          sw.cg != nullptr ? sw.cg + (t - 1) * per_t : nullptr};
    // The logit gradient's term: none at t = 1 (V^(0) = 0) or with detach (c^(r) constant).
    const bool logit_grad = t > 1 && !sw.detach;
    acc_t c[kBatches<DT>], g[kBatches<DT>];
    if (logit_grad)
      coupling_and_grad<DT, kPark>(src, n, L, st, i, b0, grp, c, g, park);
    else
      coupling<DT>(src, n, L, st, i, b0, grp, c);
    const bool parked = kPark && logit_grad;
    // One walk over the rows for both terms, four row tiles at a time: their loads first,
    // then the sums, so that a batch waits for memory once (one row at a time, each row's
    // loads waited behind the previous row's store: ncu, 43% of the last pass's stalls).
    constexpr int kRows = 4;
    const LaneRows<acc_t> gs_rows = lane_rows<DT>(st.gs, st, n, L, b0);
    const LaneRows<acc_t> v_rows = lane_rows<DT>(logit_grad ? st.V : st.gs, st, n, L, b0);
#pragma unroll
    for (int r0 = 0; r0 < kGroupRows; r0 += kRows) {
      if (!has_capsule(n, grp * GJ + r0 / DT)) break;  // warp-uniform
      acc_t fg[kRows][4], fv[kRows][4];
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        const int r = r0 + m, j = grp * GJ + r / DT;
        if (parked) {  // the group's rows, as add_dots left them (capsule grp * GJ first)
          const LaneRows<acc_t> gs_park{park + kParkGs * kGroupRows * kTileElems, grp * GJ};
          const LaneRows<acc_t> v_park{park + kParkV * kGroupRows * kTileElems, grp * GJ};
          load_frag<DT>(gs_park, n, j, r % DT, fg[m]);
          load_frag<DT>(v_park, n, j, r % DT, fv[m]);
        } else {
          load_frag<DT>(gs_rows, n, j, r % DT, fg[m]);
          if (logit_grad) load_frag<DT>(v_rows, n, j, r % DT, fv[m]);
        }
      }
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        const int r = r0 + m;
        if (!has_capsule(n, grp * GJ + r / DT)) break;  // warp-uniform
        acc_t(&a)[4] = g_uh[r];
        const acc_t c0 = spread_at(c, L, r / DT, 0), c1 = spread_at(c, L, r / DT, 1);
#pragma unroll
        for (int q = 0; q < 4; ++q) a[q] += (q & 1 ? c1 : c0) * fg[m][q];
        if (logit_grad) {
          const acc_t g0 = spread_at(g, L, r / DT, 0), g1 = spread_at(g, L, r / DT, 1);
#pragma unroll
          for (int q = 0; q < 4; ++q) a[q] += (q & 1 ? g1 : g0) * fv[m][q];
        }
      }
    }
  }
}

// Row r of g_uh for (i, b0) from the couplings the gradient passes kept (every iteration
// carries gradient: t_min = 1, no detach): sum_t c^(t) gs^(t) + gbeta^(t) V^(t-1), where
// c^(1) is uniform and t = 1 has no logit term (V^(0) = 0), added to `a` for the iterations
// t_begin .. r. A row of a capsule past N_out (and batch elements past B) adds zeros. The
// loads of P iterations are issued before the first is used: one L2 round trip per row for
// up to three iterations, where one per iteration left the last pass waiting on them (ncu: a
// quarter of its stall samples on the first FMA after the loads). float64 takes one at a
// time (its values take two registers).
template <typename acc_t>
struct KeptPairs {  // where the lane's pairs of row r's capsule are, at iteration t = 2
  const Pair<acc_t>* kc;
  int64_t plane, next_t;  // from a c pair to its gbeta pair, and from t's pairs to t + 1's
};
template <int DT, typename acc_t>
__device__ __forceinline__ KeptPairs<acc_t> kept_pairs(const Dims& n, const Lane& L,
                                                       const Sweep<acc_t>& sw, int64_t i,
                                                       int64_t b0, int grp, int r) {
  const KeptSteps s = kept_steps(n);
  return {reinterpret_cast<const Pair<acc_t>*>(sw.kept + kept_pair_offset<DT>(n, L, i, b0, grp)) +
              (r / DT) * s.capsule,
          s.plane, s.next_t};
}
// a += c^(t) gs^(t) + gbeta^(t) V^(t-1) at the lane's slots (c, g: its pairs, batch half q & 1).
template <typename acc_t>
__device__ __forceinline__ void add_kept_terms(const Pair<acc_t>& c, const Pair<acc_t>& g,
                                               const acc_t (&fg)[4], const acc_t (&fv)[4],
                                               acc_t (&a)[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    a[q] += (q & 1 ? c.y : c.x) * fg[q];
    a[q] += (q & 1 ? g.y : g.x) * fv[q];
  }
}
template <int DT, typename acc_t, int P = std::is_same<acc_t, float>::value ? 3 : 1>
__device__ __forceinline__ void kept_rows(const Dims& n, const Lane& L, const Sweep<acc_t>& sw,
                                          int64_t i, int64_t b0, int grp, int r, int t_begin,
                                          acc_t (&a)[4]) {
  constexpr int GJ = kGroupRows / DT;
  const int64_t stride = tiled_elems(n);
  const State<acc_t> global{nullptr, nullptr, nullptr, false, 0, n.N_out};
  const int jl = r / DT, j = grp * GJ + jl;
  const bool has = has_capsule(n, j);
  // Iteration t's gs^(t) and V^(t-1), both at t - 1, and its pair (lane t: batch 2t, 2t + 1)
  // of c^(t) and, a plane on, gbeta^(t) (see keep_couplings): walked one iteration at a time.
  LaneRows<acc_t> gs = lane_rows<DT>(sw.gs + (t_begin - 1) * stride, global, n, L, b0);
  LaneRows<acc_t> V = lane_rows<DT>(sw.V_prev + (t_begin - 1) * stride, global, n, L, b0);
  const KeptPairs<acc_t> kp = kept_pairs<DT>(n, L, sw, i, b0, grp, r);
  const int64_t plane = kp.plane, next_t = kp.next_t;
  const Pair<acc_t>* kc = kp.kc + (t_begin > 2 ? (t_begin - 2) * next_t : 0);
  const acc_t uniform = uniform_coupling<acc_t>(n);
  for (int t0 = t_begin; t0 <= sw.iterations; t0 += P) {
    acc_t fg[P][4], fv[P][4];
    Pair<acc_t> c[P], g[P];
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int t = t0 + p;
      if (t > sw.iterations) break;
      load_frag<DT>(gs, n, j, r % DT, fg[p]);
      if (t > 1) {
        load_frag<DT>(V, n, j, r % DT, fv[p]);
        c[p] = has ? kc[0] : Pair<acc_t>{0, 0};
        g[p] = has ? kc[plane] : Pair<acc_t>{0, 0};
        kc += next_t;
      }
      gs.p += stride;
      V.p += stride;
    }
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int t = t0 + p;
      if (t > sw.iterations) break;
      if (t == 1) {
#pragma unroll
        for (int q = 0; q < 4; ++q) a[q] += uniform * fg[p][q];
      } else {
        add_kept_terms(c[p], g[p], fg[p], fv[p], a);
      }
    }
  }
}

// route: grad_u_hat = g_uh, a row tile at a time: made by prediction_grad for the warp's 16
// rows at once, or with kept couplings (kKept) from loads, a row at a time (kept_rows).
template <int DT, typename scalar_t, bool kKept>
__global__ void __launch_bounds__(128)
route_grad_kernel(GivenSource<scalar_t> src, Dims n, Sweep<typename Scalar<scalar_t>::acc> sw,
                  scalar_t* __restrict__ grad_u_hat) {
  using acc_t = typename Scalar<scalar_t>::acc;
  constexpr int GJ = kGroupRows / DT;
  const Lane L;
  const int64_t i = int64_t(blockIdx.x) * final_warps<acc_t>() + (threadIdx.x >> 5);
  const int grp = blockIdx.y;
  if (i >= n.N_in) return;
  auto store = [&](int64_t b0, int r, const acc_t (&x)[4]) {
    const int64_t j = int64_t(grp) * GJ + r / DT;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t b = b0 + L.col(q);
      const int d = L.dim(r % DT, q);
      if (j < n.N_out && b < n.B && d < n.D_out)
        grad_u_hat[(coupling_row(n, b, i) + j) * n.D_out + d] = Scalar<scalar_t>::store(x[q]);
    }
  };
  for (int64_t b0 = 0; b0 < n.B; b0 += kTileB) {
    if constexpr (kKept) {
#pragma unroll 1
      for (int r = 0; r < kGroupRows; ++r) {
        if (!has_capsule(n, grp * GJ + r / DT)) break;  // warp-uniform
        acc_t a[4] = {0, 0, 0, 0};
        kept_rows<DT>(n, L, sw, i, b0, grp, r, 1, a);
        store(b0, r, a);
      }
    } else {
      acc_t g_uh[kGroupRows][4];
      prediction_grad<DT>(src, n, L, sw, i, b0, grp, g_uh);
#pragma unroll
      for (int r = 0; r < kGroupRows; ++r) store(b0, r, g_uh[r]);
    }
  }
}

// dynamic_routing: grad_u[b, i, k] = sum_(j,d) W[i,j,d,k] g_uh[b,i,j,d] for 8 input dims k
// (straight into grad_u with one group of output capsules, else into grad_u_part[grp]: see
// store_grad_u), and grad_W[i, j, d, k] = sum_b g_uh[b,i,j,d] u[b,i,k] for the group's (j, d).
// A block owns one input capsule, one group and one chunk of 8 input dims: its warps share
// W[i] (staged once in shared memory when it fits) and take the batch tiles in turn (warp w
// of weight_grad_warps: tiles w, w + weight_grad_warps, ...). Each warp sums its share of
// grad_W[i] (float32: in shared memory, float64: in registers); at the end the warps' partial
// sums are added in warp order (deterministic, no atomics).
// grid = (N_in, n_groups, ceil(D_in / 8)); dynamic shared memory: weight_grad_layout().
//
// Two ways to get g_uh, one instantiation each (kKept):
// - false: prediction_grad makes the warp's 16 rows of g_uh (recomputing predictions, logits
//   and the softmax of every iteration) into registers, then read row by row;
// - true, where the gradient passes kept their couplings (sw.kept): each row of g_uh is a few
//   loads and FMAs (kept_rows; float32 stages a row's loads one row ahead, stage_ring_row)
//   and is used at once. No predictions, no g_uh tile and a fraction of the registers: two
//   blocks fit per multiprocessor (float32 accumulation).
//
// grad_W's sum over the batch is a matrix product per row tile r (16 (j, d) rows):
// gW_r[16 x 8 dims k] += g_uh_r[16 x 8 batch] u[8 batch x 8 dims k]. In float32 it runs on the
// matrix units with no data movement: g_uh_r in the accumulator layout (lane: rows g, g + 8;
// batch 2t, 2t + 1) is already an A operand once the batch axis is read in the order
// (0, 2, 4, 6, 1, 3, 5, 7) — A's column t is batch 2t, column t + 4 is batch 2t + 1 — and B's
// rows (u) follow the same order. float64 stages the tile in shared memory and uses FMAs,
// each lane owning 8 whole rows.
// Warps per block: 8, or 4 in float64, whose g_uh and u tiles (16.6 KB a warp) would take
// 133 KB of shared memory at 8, more than a block may have on GPUs of compute capability 8.6,
// 8.9 and 12.0 (99 KB). With its 255 registers a thread, a multiprocessor runs as many float64
// warps either way (two blocks of 4 or one of 8).
template <typename acc_t>
constexpr int weight_grad_warps() {
  return sizeof(acc_t) == 8 ? 4 : 8;
}
constexpr int kFinalRows = kGroupRows * kTileD;  // (j, d) rows of a group: 256
constexpr int kFinalTileStride = kFinalRows + 1;  // a g_uh tile row, padded against bank conflicts

// Where lane `lane`'s accumulator e (of 64) of grad_W sits: row (j, d) of the group, dim k.
template <typename acc_t>
__host__ __device__ inline void weight_grad_slot(int e, int lane, int& row, int& k) {
  if (std::is_same<acc_t, float>::value) {  // accumulator layout, e = 4 r + q
    const int r = e / 4, q = e % 4, g = lane >> 2, t = lane & 3;
    row = r * kTileD + g + 8 * (q >> 1);
    k = 2 * t + (q & 1);
  } else {  // whole rows, e = 8 m + k
    row = lane + 32 * (e / 8);
    k = e % 8;
  }
}

// The kernel's shared memory: head = the warps' grad_W accumulators (kFinalAccBytes), then
// their rings (float32, kept) or parked rows (float32, park), or the g_uh and u tiles
// (float64); W[i] = the group's rows (w_shared), then the operands with fragments.
constexpr size_t kFinalAccBytes = size_t(weight_grad_warps<float>()) * 64 * 32 * sizeof(float);
// The rings of the kept pass in float32 (see stage_ring_row).
constexpr int kRingIterations = 3;
constexpr int kRingTiles = 2 * kRingIterations - 1;  // gs^(1), gs^(2), gs^(3), V^(1), V^(2)
constexpr size_t kRingBytes =
    size_t(weight_grad_warps<float>()) * 2 * kRingTiles * kTileElems * sizeof(float);
// The rows parked by the recomputing pass in float32 (see prediction_grad): per warp, a
// group's row tiles of V^(t-1) and of gs^(t), 16 KB (128 KB a block).
constexpr int kParkTiles = 2 * kGroupRows;
constexpr size_t kParkBytes =
    size_t(weight_grad_warps<float>()) * kParkTiles * kTileElems * sizeof(float);
template <typename scalar_t, typename acc_t>
__host__ __device__ inline SmemLayout weight_grad_layout(const Dims& n, bool fragments,
                                                         bool kept, bool park = false) {
  const size_t tiles = std::is_same<acc_t, float>::value
                           ? kFinalAccBytes + (kept ? kRingBytes : park ? kParkBytes : 0)
                           : size_t(weight_grad_warps<acc_t>()) * kTileB *
                                 (kFinalTileStride + 8) * sizeof(acc_t);
  const size_t w_bytes = n.w_shared ? widest_group_cols(n) * n.D_in * sizeof(scalar_t) : 0;
  return smem_layout<scalar_t>(n, tiles, w_bytes, fragments, 1, weight_grad_warps<acc_t>());
}

// grad_u's share of row tile r of g_uh (capsule j, the lane's dims d; j < N_out):
// gu[h][k] += W[i, j, d, k0 + k] g_uh[b0 + 2t + h, j, d]. w_rows: W[i] from capsule w_j0 on.
template <int DT, typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_grad_u(const scalar_t* w_rows, int64_t w_j0, const Dims& n,
                                           const Lane& L, int grp, int r, int64_t k0,
                                           const acc_t (&gr)[4], acc_t (&gu)[2][8]) {
  const int64_t j = int64_t(grp) * (kGroupRows / DT) + r / DT;
#pragma unroll
  for (int dh = 0; dh < 2; ++dh) {
    const int d = L.dim(r % DT, 2 * dh);
    if (d >= n.D_out) continue;
    const scalar_t* w = w_rows + ((j - w_j0) * n.D_out + d) * n.D_in + k0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (k0 + k >= n.D_in) break;
      const acc_t wk = Scalar<scalar_t>::load(w + k);
      gu[0][k] += wk * gr[2 * dh];
      gu[1][k] += wk * gr[2 * dh + 1];
    }
  }
}

// The same from W[i]'s group rows staged in shared memory with whole 16-byte rows of 8
// input dims (n.rows8: D_in % 8 == 0, and staged rows start 16-byte aligned): each dim's 8
// weights are one or a few 16-byte loads from shared memory, with 32-bit offsets and no test
// per k. The general form above tests every k against D_in and reads through a generic
// pointer (W is in global memory where it does not fit): ~130 instructions a row, a third
// of the kept last pass's (SASS).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row8(const scalar_t* p, acc_t (&w)[8]) {
  constexpr int kPer = 16 / sizeof(scalar_t);
#pragma unroll
  for (int v = 0; v < 8 / kPer; ++v) {
    const uint4 x = reinterpret_cast<const uint4*>(p)[v];
    scalar_t e[kPer];
    memcpy(e, &x, sizeof(x));
#pragma unroll
    for (int m = 0; m < kPer; ++m) w[v * kPer + m] = Scalar<scalar_t>::load(e + m);
  }
}
// The lane's two rows of a row tile: row d at w (from input dim k0), row d + 8 `step`
// elements on; in[dh]: whether row d + 8 dh exists (< D_out).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_grad_u_rows(const scalar_t* w, int step, const bool (&in)[2],
                                                const acc_t (&gr)[4], acc_t (&gu)[2][8]) {
#pragma unroll
  for (int dh = 0; dh < 2; ++dh) {
    if (!in[dh]) continue;
    acc_t wk[8];
    load_row8(w + dh * step, wk);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      gu[0][k] += wk[k] * gr[2 * dh];
      gu[1][k] += wk[k] * gr[2 * dh + 1];
    }
  }
}
template <int DT, typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_grad_u_staged(const scalar_t* w_group, const Dims& n,
                                                  const Lane& L, int r, int k0,
                                                  const acc_t (&gr)[4], acc_t (&gu)[2][8]) {
  const int D_in = static_cast<int>(n.D_in), D_out = static_cast<int>(n.D_out);
  const int d = L.dim(r % DT, 0);
  const bool in[2] = {d < D_out, d + 8 < D_out};
  add_grad_u_rows(w_group + ((r / DT) * D_out + d) * D_in + k0, 8 * D_in, in, gr, gu);
}

// The 8 lanes that share t add up their dims of gu, each sum left in one of them
// (reduce_scatter: 14 shuffles, where 8 copies of all 16 sums took 48); lane g writes
// grad_u[b, i, k0 + k] of batch half g / 4, dims k = 2 (g % 4), 2 (g % 4) + 1: into grad_u
// itself, in the inputs' dtype, where it is given (one group of output capsules), else into
// the group's part in the accumulation type, grad_u_part[grp, b, i, k], which the launcher
// sums over the groups.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_grad_u(const Dims& n, const Lane& L, int grp, int64_t i,
                                             int64_t b0, int64_t k0, const acc_t (&gu)[2][8],
                                             acc_t* grad_u_part, scalar_t* grad_u) {
  acc_t x[16];  // x[h * 8 + k]
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int k = 0; k < 8; ++k) x[h * 8 + k] = gu[h][k];
  reduce_scatter(x, L);
  const int64_t b = b0 + 2 * L.t + (L.g >> 2);
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int64_t k = k0 + 2 * (L.g & 3) + e;
    if (b < n.B && k < n.D_in) {
      const int64_t at = ((int64_t(grp) * n.B + b) * n.N_in + i) * n.D_in + k;
      if (grad_u != nullptr)
        grad_u[at] = Scalar<scalar_t>::store(x[e]);  // grp = 0
      else
        grad_u_part[at] = x[e];
    }
  }
}

// float32 accumulation: the B operand of grad_W's product, u in the permuted batch order:
// b[0] = u[2t][k0 + g], b[1] = u[2t + 1][k0 + g], split into TF32 parts.
template <typename scalar_t>
__device__ __forceinline__ void weight_grad_operand(const scalar_t* u, const Dims& n,
                                                    const Lane& L, int64_t i, int64_t b0,
                                                    int64_t k0, uint32_t (&bh)[2],
                                                    uint32_t (&bl)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
    split_tf32<false>(u_at(u, n, b0 + 2 * L.t + h, i, k0 + L.g), bh[h], bl[h]);
}

// ... and row tile r's product, added to the lane's 4 accumulators d of that row tile (slot
// q: row g + 8 (q >> 1), dim k0 + 2t + (q & 1)). A = g_uh_r: a = {[g][2t], [g + 8][2t],
// [g][2t + 1], [g + 8][2t + 1]} = slots 0, 2, 1, 3. The accumulators run over many batch
// tiles, so the product is added with FADDs (mma_split_add).
__device__ __forceinline__ void add_weight_grad(float (&d)[4], const float (&gr)[4],
                                                const uint32_t (&bh)[2], const uint32_t (&bl)[2]) {
  uint32_t ah[4], al[4];
  split_tf32<false>(gr[0], ah[0], al[0]);
  split_tf32<false>(gr[2], ah[1], al[1]);
  split_tf32<false>(gr[1], ah[2], al[2]);
  split_tf32<false>(gr[3], ah[3], al[3]);
  mma_split_add<false>(d, ah, al, bh, bl);
}
// The same with the accumulators in shared memory (gw_s: slot e = 4 r + q at
// gw_s[e * 32 + lane]).
__device__ __forceinline__ void add_weight_grad(float* gw_s, int lane, int r, const float (&gr)[4],
                                                const uint32_t (&bh)[2], const uint32_t (&bl)[2]) {
  float d[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) d[q] = gw_s[(4 * r + q) * 32 + lane];
  add_weight_grad(d, gr, bh, bl);
#pragma unroll
  for (int q = 0; q < 4; ++q) gw_s[(4 * r + q) * 32 + lane] = d[q];
}

// float64: row tile r of g_uh into the warp's tile, [batch][(j, d) row] (zeros for capsules
// past N_out: every row is summed) ...
template <typename acc_t>
__device__ __forceinline__ void stage_grad_row(acc_t* tile_g, const Lane& L, int r, bool has,
                                               const acc_t (&gr)[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q)
    tile_g[L.col(q) * kFinalTileStride + r * kTileD + L.dim(0, q)] = has ? gr[q] : acc_t(0);
}

// ... and, once the tile holds all 16 rows, the lane's rows (lane + 32 m) of grad_W summed
// over the tile's batch elements, with u[b, i, k0 .. k0 + 7] staged beside it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_weight_grad_fma(const acc_t* tile_g, acc_t* tile_u,
                                                    const scalar_t* u, const Dims& n,
                                                    const Lane& L, int64_t i, int64_t b0,
                                                    int64_t k0, acc_t (&gW)[64]) {
  const int lane = threadIdx.x & 31;
  if (L.g == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int k = 0; k < 8; ++k)
        tile_u[(2 * L.t + h) * 8 + k] = u_at(u, n, b0 + 2 * L.t + h, i, k0 + k);
    }
  }
  __syncwarp();
#pragma unroll
  for (int bb = 0; bb < kTileB; ++bb) {
    acc_t ub[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) ub[k] = tile_u[bb * 8 + k];
#pragma unroll
    for (int m = 0; m < kFinalRows / 32; ++m) {
      const acc_t gv = tile_g[bb * kFinalTileStride + lane + 32 * m];
#pragma unroll
      for (int k = 0; k < 8; ++k) gW[8 * m + k] += gv * ub[k];
    }
  }
  __syncwarp();
}

// The last pass with kept couplings in float32 accumulation: a warp's ring of two row slots in
// shared memory. While row r is summed, the next row's tiles of gs^(t) and V^(t-1) for
// t <= kRingIterations are copied into the other slot (cp.async, each lane its own fragment,
// so that a lane reads only what it copied itself) and its kept pairs are loaded into
// registers: a row's L2 round trip overlaps the previous row's work, where each row waited
// for its own (ncu: long-scoreboard stalls, a third of the pass's). Later iterations (r > 3)
// are loaded as kept_rows does. Registers held no staging room for a row ahead: the pass
// runs two blocks per SM at 128.

struct RingPairs {  // the lane's kept pairs of a row: c^(t) and gbeta^(t), t = 2 .. 3
  Pair<float> c[kRingIterations - 1], g[kRingIterations - 1];
};

// Where the lane's sources of one row of the ring are: its fragment of gs^(1) and the same
// place in V_prev (gs^(t) and V^(t-1) are t - 1 arrays on), and its pair of c^(2). Found in
// full once per batch tile (ring_source); a tile's rows follow at fixed steps (next_row),
// where every row's 64-bit indices took ~60 instructions (SASS).
struct RingSource {
  const float* gs;
  const float* V;
  const Pair<float>* kc;
};
struct RingSteps {  // the sources' loop invariants
  int64_t stride;         // from one iteration's tiled array to the next
  int64_t next_t, plane;  // kept pairs: t's to t + 1's, and a c pair to its gbeta pair
  int64_t capsule_pairs;  // kept pairs: one capsule's to the next one's
};
__device__ __forceinline__ RingSteps ring_steps(const Dims& n) {
  const KeptSteps s = kept_steps(n);
  return {tiled_elems(n), s.next_t, s.plane, s.capsule};
}
// Row 0 of batch tile b0 ...
template <int DT>
__device__ __forceinline__ RingSource ring_source(const Dims& n, const Lane& L,
                                                  const Sweep<float>& sw, int64_t i, int64_t b0,
                                                  int grp) {
  const int64_t at =
      ((b0 / kTileB) * n.N_out + int64_t(grp) * (kGroupRows / DT)) * DT * kTileElems + L.slots();
  return {sw.gs + at, sw.V_prev + at, kept_pairs<DT>(n, L, sw, i, b0, grp, 0).kc};
}
// ... and from row r to row r + 1 of the same tile (row tiles follow each other in the tiled
// arrays; a capsule's pairs change every DT rows).
template <int DT>
__device__ __forceinline__ void next_row(RingSource& x, const RingSteps& s, int r) {
  x.gs += kTileElems;
  x.V += kTileElems;
  if ((r + 1) % DT == 0) x.kc += s.capsule_pairs;
}

// The row at x (a capsule that exists) into `slot`, and its pairs.
__device__ __forceinline__ RingPairs stage_ring_row(const RingSource& x, const RingSteps& s,
                                                    int iterations, int off, float* slot) {
  RingPairs p;
#pragma unroll
  for (int t = 1; t <= kRingIterations; ++t) {
    const bool in = t <= iterations;
    if (in) cp_async16(slot + (t - 1) * kTileElems + off, x.gs + (t - 1) * s.stride);
    if (t == 1) continue;
    if (in)
      cp_async16(slot + (kRingIterations + t - 2) * kTileElems + off, x.V + (t - 1) * s.stride);
    p.c[t - 2] = in ? x.kc[(t - 2) * s.next_t] : Pair<float>{0, 0};
    p.g[t - 2] = in ? x.kc[(t - 2) * s.next_t + s.plane] : Pair<float>{0, 0};
  }
  return p;
}

// ... and, once its copies have landed, the row's terms of iterations 1 .. 3 into `a`.
__device__ __forceinline__ void ring_row(const Dims& n, const Lane& L, const float* slot,
                                         int iterations, const RingPairs& x, float (&a)[4]) {
  const int off = L.slots();
  const float uniform = uniform_coupling<float>(n);
  float f[4];
  load4(slot + off, f);
#pragma unroll
  for (int q = 0; q < 4; ++q) a[q] = uniform * f[q];
#pragma unroll
  for (int t = 2; t <= kRingIterations; ++t) {
    if (t > iterations) break;
    float fv[4];
    load4(slot + (t - 1) * kTileElems + off, f);
    load4(slot + (kRingIterations + t - 2) * kTileElems + off, fv);
    add_kept_terms(x.c[t - 2], x.g[t - 2], f, fv, a);
  }
}

// grad_W[i, j, d, k0 + k] = x for row `row` of group grp's (j, d) rows (row tile r = row / 16:
// capsule grp * GJ + r / DT, dim (r % DT) * 16 + row % 16), where that entry exists.
template <int DT, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_weight_grad(const Dims& n, scalar_t* grad_W, int64_t i,
                                                  int grp, int64_t k0, int row, int k, acc_t x) {
  const int r = row / kTileD;
  const int64_t j = int64_t(grp) * (kGroupRows / DT) + r / DT;
  const int d = (r % DT) * kTileD + row % kTileD;
  if (j < n.N_out && d < n.D_out && k0 + k < n.D_in)
    grad_W[((i * n.N_out + j) * n.D_out + d) * n.D_in + k0 + k] = Scalar<scalar_t>::store(x);
}

// Two blocks per SM with the couplings kept (float32 accumulation: ~109 KB of shared memory
// each for the MNIST layer, the ring included); recomputing needs all the registers.
// kPark (recomputing, float32 accumulation): prediction_grad parks the rows it reads twice in
// the warp's shared memory (weight_grad_layout's park).
template <int DT, typename Src, typename scalar_t, bool kKept, bool kPark = false>
__global__ void __launch_bounds__(weight_grad_warps<typename Scalar<scalar_t>::acc>() * 32,
                                  blocks_per_sm<scalar_t>(kKept ? 2 : 1))
weight_grad_kernel(Src src, Dims n, Sweep<typename Scalar<scalar_t>::acc> sw,
                   typename Scalar<scalar_t>::acc* __restrict__ grad_u_part,
                   scalar_t* __restrict__ grad_u, scalar_t* __restrict__ grad_W) {
  using acc_t = typename Scalar<scalar_t>::acc;
  constexpr int kGradWarps = weight_grad_warps<acc_t>();
  constexpr int GJ = kGroupRows / DT;
  constexpr bool kMatrixUnits = std::is_same<acc_t, float>::value;
  static_assert(!(kKept && Src::kFragments), "kept couplings need no prediction operands");
  static_assert(!kPark || (!kKept && kMatrixUnits),
                "only the recomputing pass with float32 accumulation parks rows");
  const Lane L;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t i = blockIdx.x;
  const int grp = blockIdx.y;
  const int64_t k0 = int64_t(blockIdx.z) * 8;

  unsigned char* smem = dynamic_smem<unsigned char>();
  const SmemLayout layout = weight_grad_layout<scalar_t, acc_t>(n, Src::kFragments, kKept, kPark);
  // W[i]'s rows from output capsule w_j0 on (for grad_u): all of them in global memory, or
  // the group's in shared memory (always with fragments).
  const scalar_t* w_rows = src.W + i * n.J * n.D_in;
  int64_t w_j0 = 0;
  if (n.w_shared) {
    scalar_t* w = reinterpret_cast<scalar_t*>(smem + layout.w);
    stage_weight(src, n, i, grp, w);
    cp_async_commit();
    cp_async_wait_all();
    w_rows = w;
    w_j0 = group_j0(n, grp);
  }
  __syncthreads();
  if constexpr (Src::kFragments) {  // the predictions' operands (one input capsule: once)
    src.Wf = reinterpret_cast<uint4*>(smem + layout.wf);
    src.Uf = reinterpret_cast<uint4*>(smem + layout.uf) + warp * n.k_chunks * 32;
    build_fragments<DT, Src::kChunks>(w_rows, n, grp, src.Wf);
    __syncthreads();
  } else {
    src.Wi = w_rows;
    src.wi_j0 = w_j0;
  }

  // A lane's 64 accumulators of grad_W (see weight_grad_slot): float32 keeps them in shared
  // memory, in fragment order (gw_s[e * 32 + lane], conflict-free), so that they are not live
  // in registers while g_uh is made; float64 in registers.
  acc_t gW[kMatrixUnits ? 1 : 64];
  acc_t* gw_s = reinterpret_cast<acc_t*>(smem) + warp * 64 * 32;
#pragma unroll
  for (int e = 0; e < 64; ++e) {
    if constexpr (kMatrixUnits)
      gw_s[e * 32 + lane] = acc_t(0);
    else
      gW[e] = acc_t(0);
  }
  // float64: the warp's g_uh and u tiles.
  acc_t* tile_g = reinterpret_cast<acc_t*>(smem) + warp * kTileB * kFinalTileStride;
  acc_t* tile_u = reinterpret_cast<acc_t*>(smem) + kGradWarps * kTileB * kFinalTileStride +
                  warp * kTileB * 8;

  // float32, kept: the warp's ring (see stage_ring_row), its first row staged ahead; `step`
  // counts the rows, whose slots alternate.
  float* ring =
      reinterpret_cast<float*>(smem + kFinalAccBytes) + warp * 2 * kRingTiles * kTileElems;
  // float32, park: the warp's parked rows, at the lane's slots.
  acc_t* park = kPark ? reinterpret_cast<acc_t*>(smem + kFinalAccBytes) +
                            warp * kParkTiles * kTileElems + L.slots()
                      : nullptr;
  const int rows = static_cast<int>(min(int64_t(kGroupRows), (n.N_out - int64_t(grp) * GJ) * DT));
  RingPairs ring_pairs;
  RingSteps strides;
  RingSource next;  // the last row staged
  int step = 0;
  if constexpr (kKept && kMatrixUnits) {
    strides = ring_steps(n);
    if (int64_t(warp) * kTileB < n.B) {
      next = ring_source<DT>(n, L, sw, i, int64_t(warp) * kTileB, grp);
      ring_pairs = stage_ring_row(next, strides, sw.iterations, L.slots(), ring);
    }
    cp_async_commit();
  }
  // W[i]'s group rows in shared memory as whole 16-byte rows: grad_u from them by
  // add_grad_u_staged.
  const bool w_staged = n.w_shared && n.rows8;
  auto grad_u_row = [&](int r, const acc_t (&a)[4], acc_t (&gu)[2][8]) {
    if (w_staged)  // (the pointer made here, where the compiler sees that it is shared memory)
      add_grad_u_staged<DT>(reinterpret_cast<const scalar_t*>(smem + layout.w), n, L, r,
                            static_cast<int>(k0), a, gu);
    else
      add_grad_u<DT>(w_rows, w_j0, n, L, grp, r, k0, a, gu);
  };

  for (int64_t b0 = int64_t(warp) * kTileB; b0 < n.B; b0 += kGradWarps * kTileB) {
    acc_t gu[2][8];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int k = 0; k < 8; ++k) gu[h][k] = acc_t(0);
    if constexpr (kKept) {
      // One row of g_uh at a time, used as soon as it is made, in a loop that is not unrolled
      // (ptxas, float32: 128 registers and no spills, as two blocks per SM need; unrolled, the
      // compiler hoisted later rows' loads into 244 registers). float32 stages the next row in
      // the ring meanwhile; float64 (kept_rows) issues a row's loads when it needs them.
      uint32_t bh[2], bl[2];
      if constexpr (kMatrixUnits) weight_grad_operand(src.u, n, L, i, b0, k0, bh, bl);
#pragma unroll 1
      for (int r = 0; r < kGroupRows; ++r) {
        const bool has = has_capsule(n, grp * GJ + r / DT);  // warp-uniform
        // (float64 walks every row: its tile must hold zeros past N_out)
        if (kMatrixUnits && !has) break;
        acc_t a[4] = {0, 0, 0, 0};
        if constexpr (kMatrixUnits) {
          // The next row (this tile's, or the warp's next tile's first) into the other slot,
          // then this row from its slot once its copies (all but the newest group) have landed.
          const RingPairs pairs = ring_pairs;
          const int64_t next_b0 = r + 1 < rows ? b0 : b0 + kGradWarps * kTileB;
          if (next_b0 < n.B) {
            if (r + 1 < rows)
              next_row<DT>(next, strides, r);
            else
              next = ring_source<DT>(n, L, sw, i, next_b0, grp);
            ring_pairs = stage_ring_row(next, strides, sw.iterations, L.slots(),
                                        ring + ((step + 1) & 1) * kRingTiles * kTileElems);
          }
          cp_async_commit();
          cp_async_wait_one();
          ring_row(n, L, ring + (step & 1) * kRingTiles * kTileElems, sw.iterations, pairs, a);
          ++step;
          if (sw.iterations > kRingIterations)
            kept_rows<DT>(n, L, sw, i, b0, grp, r, kRingIterations + 1, a);
        } else {
          kept_rows<DT>(n, L, sw, i, b0, grp, r, 1, a);
        }
        if (has) grad_u_row(r, a, gu);
        if constexpr (kMatrixUnits) {
          if (has) add_weight_grad(gw_s, lane, r, a, bh, bl);
        } else {
          stage_grad_row(tile_g, L, r, has, a);
        }
      }
      store_grad_u(n, L, grp, i, b0, k0, gu, grad_u_part, grad_u);
    } else {
      // g_uh of the warp's batch tile.
      acc_t g_uh[kGroupRows][4];
      if constexpr (Src::kFragments) stage_u(src, n, L, i, b0);
      prediction_grad<DT, kPark>(src, n, L, sw, i, b0, grp, g_uh, park);
#pragma unroll
      for (int r = 0; r < kGroupRows; ++r) {
        if (!has_capsule(n, grp * GJ + r / DT)) break;  // warp-uniform
        grad_u_row(r, g_uh[r], gu);
      }
      store_grad_u(n, L, grp, i, b0, k0, gu, grad_u_part, grad_u);
      if constexpr (kMatrixUnits) {
        uint32_t bh[2], bl[2];
        weight_grad_operand(src.u, n, L, i, b0, k0, bh, bl);
#pragma unroll
        for (int r = 0; r < kGroupRows; ++r) {
          if (!has_capsule(n, grp * GJ + r / DT)) break;  // warp-uniform
          add_weight_grad(gw_s, lane, r, g_uh[r], bh, bl);
        }
      } else {
#pragma unroll
        for (int r = 0; r < kGroupRows; ++r)
          stage_grad_row(tile_g, L, r, has_capsule(n, grp * GJ + r / DT), g_uh[r]);
      }
    }
    // float64: the tile of g_uh, staged row by row above, into grad_W's sums.
    if constexpr (!kMatrixUnits) add_weight_grad_fma(tile_g, tile_u, src.u, n, L, i, b0, k0, gW);
  }

  // The warps' partial grad_W[i] ([256 rows][8 dims]), added in warp order into `sum`.
  acc_t* sum = reinterpret_cast<acc_t*>(smem);
  if constexpr (kMatrixUnits) {
    // Every warp's accumulators are in shared memory: after the barrier each thread adds up
    // 8 accumulator slots (e, lane) over the warps, then (second barrier) writes them over the
    // first warp's area at their (row, k).
    __syncthreads();
    constexpr int kPer = 64 * 32 / (kGradWarps * 32);
    acc_t mine[kPer];
#pragma unroll
    for (int m = 0; m < kPer; ++m) {
      const int e = (threadIdx.x >> 5) + m * kGradWarps;
      acc_t x = 0;
      for (int w = 0; w < kGradWarps; ++w) x += sum[(w * 64 + e) * 32 + lane];
      mine[m] = x;
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < kPer; ++m) {
      int row, k;
      weight_grad_slot<acc_t>((threadIdx.x >> 5) + m * kGradWarps, lane, row, k);
      sum[row * 8 + k] = mine[m];
    }
    __syncthreads();
  } else {
    // In the first g_uh tile's space (8 x 257 >= 256 x 8 elements), which its owner, warp 0,
    // writes only after its own loop.
    for (int w = 0; w < kGradWarps; ++w) {
      if (warp == w) {
#pragma unroll
        for (int e = 0; e < 64; ++e) {
          int row, k;
          weight_grad_slot<acc_t>(e, lane, row, k);
          acc_t& x = sum[row * 8 + k];
          x = (w == 0 ? acc_t(0) : x) + gW[e];
        }
      }
      __syncthreads();
    }
  }
  for (int e = threadIdx.x; e < kFinalRows * 8; e += blockDim.x)
    store_weight_grad<DT>(n, grad_W, i, grp, k0, e / 8, e % 8, sum[e]);
}

// --- the last pass with kept couplings, one input capsule per warp ----------------------
//
// weight_grad_kernel gives a block one input capsule and its warps the batch tiles in turn, so
// every block reads every batch tile's rows of gs^(t) and V^(t-1) from L2, although they are
// the same for all input capsules: ~470 MB per call at the canonical shape, where the kernel
// took 98 µs (H100, ~4.8 TB/s). Here a block's warps own `warps` consecutive input capsules
// and walk all batch tiles together: a tile's rows are copied into shared memory once for the
// block (each thread a share) and read by every warp, so L2 serves them once per `warps`
// capsules. Beside them each warp copies its capsule's kept pairs of the tile; the next
// tile's copies are in flight while this one is used (two buffers, two barriers a tile).
// A warp owns its capsule's whole sum over the batch: grad_W in registers (4 per row tile a
// lane, in the product's accumulator layout), written once at the end, with no sum across
// warps. Per row tile the work is that of weight_grad_kernel's kept float32 pass (g_uh from
// the kept pairs, grad_u by FMAs on W[i]'s 16-byte rows, grad_W on the matrix units), its
// operands from shared memory at 32-bit offsets.
// Used where it applies (capsule_grad_warps: float32 accumulation, couplings kept, rows8,
// enough input capsules to give every multiprocessor a block of at least kCapsuleWarpsMin
// warps); weight_grad_kernel otherwise.
// grid = (ceil(N_in / warps), n_groups, ceil(D_in / 8)); shared memory: capsule_grad_layout.
// Below ~6 warps per SM (1.5 per scheduler) the issue rate should fall so far that sharing
// the rows no longer pays for it: at N_in = 500, 4 warps a block would need ~30% issue to
// match weight_grad_kernel's L2-bound ~43 µs (counted, not measured).
constexpr int kCapsuleWarpsMin = 6;
constexpr int kCapsuleWarpsMax = 12;  // 384 threads: up to 168 registers for one block per SM

// Byte offsets of its shared memory: [2 buffers: (2r - 1) tiles of the group's rows, gs^(1..r)
// then V^(1..r-1)][2 buffers: each warp's pairs, [r - 1][c, gbeta][capsule][8 batch]][each
// warp's W[i] group rows, [capsule][D_out][D_in]]. tile_elems, pair_elems and w_elems: floats
// of one buffer's tiles, of one warp's pairs in a buffer, elements of one warp's W rows.
struct CapsuleGradLayout {
  size_t pairs, w, end;
  int64_t tile_elems, pair_elems, w_elems;
};
template <typename scalar_t>
__host__ __device__ inline CapsuleGradLayout capsule_grad_layout(const Dims& n, int iterations,
                                                                 int warps) {
  CapsuleGradLayout p;
  const int64_t caps = widest_group_caps(n);
  p.tile_elems = (2 * iterations - 1) * caps * row_tiles(n) * kTileElems;
  p.pair_elems = (iterations - 1) * 2 * caps * kTileB;
  p.w_elems = widest_group_cols(n) * n.D_in;  // a multiple of 8: 16-byte rows (rows8)
  p.pairs = 2 * p.tile_elems * sizeof(float);
  p.w = p.pairs + 2 * warps * p.pair_elems * sizeof(float);
  p.end = p.w + warps * p.w_elems * sizeof(scalar_t);
  return p;
}

// kR: the iteration count compiled in (the loop over iterations unrolled, so that the row
// tiles' code is one straight block the compiler can interleave), or 0 (sw.iterations).
template <int DT, int kR, typename scalar_t>
__global__ void __launch_bounds__(kCapsuleWarpsMax * 32, 1)
weight_grad_capsules_kernel(WeightSource<scalar_t> src, Dims n, Sweep<float> sw,
                            float* __restrict__ grad_u_part, scalar_t* __restrict__ grad_u,
                            scalar_t* __restrict__ grad_W) {
  const Lane L;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int64_t i = int64_t(blockIdx.x) * warps + warp;
  const bool mine = i < n.N_in;  // warp-uniform: a last block's extra warps copy and wait only
  const int grp = blockIdx.y;
  const int k0 = static_cast<int>(blockIdx.z) * 8;
  const int caps = static_cast<int>(group_caps(n, grp)), rows = caps * DT;
  const int R = kR > 0 ? kR : sw.iterations;
  const CapsuleGradLayout lay = capsule_grad_layout<scalar_t>(n, R, warps);
  unsigned char* smem = dynamic_smem<unsigned char>();
  float* const tiles = reinterpret_cast<float*>(smem);
  float* const pairs = reinterpret_cast<float*>(smem + lay.pairs) + warp * lay.pair_elems;
  scalar_t* const w = reinterpret_cast<scalar_t*>(smem + lay.w) + warp * lay.w_elems;

  // The warp's W[i] (group rows), with the first tile's copies below.
  if (mine) stage_weight<true>(src, n, i, grp, w);
  // Batch tile b0's copies into buffer `buf`: the block's rows (2r - 1 runs of `rows` row
  // tiles, contiguous in the tiled arrays: gs^(1..r), then V^(1..r-1)), and the warp's pairs:
  // for each tp = 2 (t - 2) + p (iteration t, plane p: c or gbeta), lane 2 jl + h copies half
  // h of capsule jl's 8 floats, at tp * kept_plane + jl * kept_batch from the first.
  const int64_t stride = tiled_elems(n), plane = kept_plane(n);
  const int run = rows * kTileElems;
  const bool pair_lane = mine && lane < 2 * caps;  // (caps <= 16)
  const float* const kept_lane =
      sw.kept + kept_index(n, i, group_j0(n, grp) + (lane >> 1), 4 * (lane & 1));
  float* const pairs_lane = pairs + (lane >> 1) * kTileB + 4 * (lane & 1);
  auto stage = [&](int64_t b0, int buf) {
    const int64_t at = ((b0 / kTileB) * n.N_out + group_j0(n, grp)) * DT * kTileElems;
    float* dst = tiles + buf * lay.tile_elems;
    for (int q = 0; q < 2 * R - 1; ++q, dst += run) {
      const float* from = (q < R ? sw.gs + q * stride : sw.V_prev + (q - R + 1) * stride) + at;
      for (int e = 4 * threadIdx.x; e < run; e += 4 * blockDim.x) cp_async16(dst + e, from + e);
    }
    if (!pair_lane) return;
    const float* from = kept_lane + b0;
    float* to = pairs_lane + buf * warps * lay.pair_elems;
    for (int tp = 0; tp < 2 * (R - 1); ++tp, from += plane, to += caps * kTileB)
      cp_async16(to, from);
  };
  // The lane's u of a tile (B operand of grad_W's product, see weight_grad_operand), loaded a
  // tile ahead.
  auto load_u = [&](int64_t b0, float (&x)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) x[h] = mine ? u_at(src.u, n, b0 + 2 * L.t + h, i, k0 + L.g) : 0.f;
  };

  float gW[kGroupRows][4] = {};
  const float uniform = uniform_coupling<float>(n);
  const int D_in = static_cast<int>(n.D_in), D_out = static_cast<int>(n.D_out);
  const int pair_plane = caps * kTileB / 2;  // pairs from a c plane to its gbeta plane
  const int w_capsule_step = (D_out - (DT - 1) * kTileD) * D_in;  // last row tile to next capsule
  bool in_rows[DT][2];  // whether the lane's rows g, g + 8 of row tile dt exist
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int dh = 0; dh < 2; ++dh) in_rows[dt][dh] = L.dim(dt, 2 * dh) < D_out;
  float u_next[2];
  load_u(0, u_next);
  stage(0, 0);
  cp_async_commit();
  int buf = 0;
  for (int64_t b0 = 0; b0 < n.B; b0 += kTileB, buf ^= 1) {
    const bool more = b0 + kTileB < n.B;
    if (more) stage(b0 + kTileB, buf ^ 1);
    cp_async_commit();
    uint32_t bh[2], bl[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) split_tf32<false>(u_next[h], bh[h], bl[h]);
    if (more) load_u(b0 + kTileB, u_next);
    cp_async_wait_one();  // this tile's copies (each thread its own) ...
    __syncthreads();      // ... and everyone else's
    if (mine) {
      const float* tl = tiles + buf * lay.tile_elems + L.slots();
      const float* pr = pairs + buf * warps * lay.pair_elems + 2 * L.t;
      // Where the lane's row g of W[i, j] (capsule 0 of the group) from dim k0 is, walked from
      // row tile to row tile (computed from r, each row's address took ~25 instructions).
      int wo = L.g * D_in + k0;
      float gu[2][8] = {};
#pragma unroll
      for (int r = 0; r < kGroupRows; ++r) {
        if (r >= rows) break;  // warp-uniform
        // g_uh's row tile r: sum_t c^(t) gs^(t) + gbeta^(t) V^(t-1), c^(1) uniform; the
        // sources walked by pointer from t to t + 1.
        const float* tg = tl + r * kTileElems;  // gs^(t)
        const float* tv = tg + R * run;          // V^(t-1)
        const Pair<float>* pc = reinterpret_cast<const Pair<float>*>(pr + (r / DT) * kTileB);
        float a[4], f[4];
        load4(tg, f);
#pragma unroll
        for (int q = 0; q < 4; ++q) a[q] = uniform * f[q];
#pragma unroll (kR > 0 ? kR : 1)
        for (int t = 2; t <= R; ++t) {
          float fg[4], fv[4];
          tg += run;
          load4(tg, fg);
          load4(tv, fv);
          add_kept_terms(pc[0], pc[pair_plane], fg, fv, a);
          tv += run;
          pc += 2 * pair_plane;
        }
        add_grad_u_rows(w + wo, 8 * D_in, in_rows[r % DT], a, gu);
        wo = opaque(wo + (r % DT == DT - 1 ? w_capsule_step : kTileD * D_in));
        add_weight_grad(gW[r], a, bh, bl);
      }
      store_grad_u(n, L, grp, i, b0, k0, gu, grad_u_part, grad_u);
    }
    __syncthreads();  // (the next tile's copies go into this buffer)
  }
  if (!mine) return;
#pragma unroll
  for (int r = 0; r < kGroupRows; ++r) {
    if (r >= rows) break;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      int row, k;
      weight_grad_slot<float>(4 * r + q, lane, row, k);
      store_weight_grad<DT>(n, grad_W, i, grp, k0, row, k, gW[r][q]);
    }
  }
}

}  // namespace cuda
}  // namespace capsroute
