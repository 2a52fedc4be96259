// Host-side launch sequences of the CUDA kernels, templated on the element type and
// instantiated once per dtype (csrc/cuda/instantiate_*.cu) so that the heavy kernels of
// different dtypes compile in parallel. The op entry points are in routing_cuda.cu.
//
// Forward, per iteration t: one pass over the input capsules (routing_pass_kernel) writes a
// partial sum per block of capsules, and finish_iteration_kernel adds them in block order,
// squashes and updates the running sum V. (At t = 1, where the couplings are uniform, the
// partial sums are those of one matrix product where first_sums_kernel applies.) Backward:
// the sweep t = r .. t_min alternates a pass that forms the logit-gradient term G with a
// per-capsule step that maps it through squash; a last pass (route_grad_kernel /
// weight_grad_kernel) forms the input gradients. With several groups of output capsules, a
// statistics pass first makes each iteration's softmax statistics over all capsules.
// Temporaries are O(B * N_out * D_out) (per-block partial sums included), plus
// O(B * N_in * iterations) statistics with several groups (and while they are made, each
// group's: O(B * N_in * groups)) and grad_u's per-group parts: nothing grows with
// N_in * N_out * D_out.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <utility>

#include "../checks.h"
#include "../op_utils.h"
#include "routing_kernels.cuh"
#include "routing_launch.h"
#include "runtime.h"

namespace capsroute {
namespace cuda_launch {

using cuda::Dims;

template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
using dev_t = typename DeviceType<scalar_t>::type;

template <typename scalar_t>
dev_t<scalar_t>* dptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? reinterpret_cast<dev_t<scalar_t>*>(t.data_ptr<scalar_t>())
                                      : nullptr;
}

template <typename acc_t>
acc_t* aptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row tiles of 16 dims per output capsule: the kernels are compiled for D_out <= 32.
inline int dim_tiles(const char* op, int64_t D_out) {
  TORCH_CHECK_VALUE(D_out <= 2 * cuda::kTileD, op,
                    ": the CUDA kernels support output capsules of at most 32 dims, but got "
                    "D_out = ", D_out);
  return D_out <= cuda::kTileD ? 1 : 2;
}

// N_in split into at most `chunks` (1 .. N_in) chunks of input capsules, one per block along
// N_in: d.i_per_block, d.n_chunks, and a partial sum per chunk.
inline void set_chunks(Dims& d, int64_t chunks) {
  d.i_per_block = static_cast<int>(ceil_div(d.N_in, chunks));
  d.n_chunks = static_cast<int>(ceil_div(d.N_in, d.i_per_block));
  d.partials = d.n_chunks;
}

// A kernel's chunks of input capsules, for a grid whose other dimensions hold `others`
// blocks: at most one wave of `per_sm` blocks per multiprocessor, as full as whole chunks
// make it, with as few per-chunk partial sums as that allows. Rounded down: where `others`
// does not divide the wave, rounding up would leave up to others - 1 blocks for a second
// wave, each as long as the first (at B = 512, others = 8: 4 of 232 blocks on a 114-SM H100
// PCIe), and the pass would take up to twice as long as one chunk fewer.
inline void plan_chunks(Dims& d, int64_t per_sm, int64_t others) {
  const int64_t wave = cuda::device_info().multiprocessors * per_sm;
  set_chunks(d, std::clamp<int64_t>(wave / others, 1, d.N_in));
}

inline Dims make_dims(const char* op, const RoutingSizes& n, bool leaky) {
  Dims d{};
  d.B = n.B;
  d.N_in = n.N_in;
  d.N_out = n.N_out;
  d.D_in = n.D_in;
  d.D_out = n.D_out;
  d.J = n.N_out * n.D_out;
  d.leaky = leaky;
  // Offsets within one capsule's weights are 32-bit in the kernels.
  TORCH_CHECK_VALUE(n.D_out * n.D_in < (int64_t(1) << 31), op,
                    ": the CUDA kernels need D_out * D_in < 2^31, but got D_out = ", n.D_out,
                    ", D_in = ", n.D_in);
  d.k_chunks = static_cast<int>(ceil_div(n.D_in, 8));
  d.caps_per_group = cuda::kGroupRows / dim_tiles(op, n.D_out);
  d.n_groups = static_cast<int>(ceil_div(n.N_out, d.caps_per_group));
  const int64_t b_tiles = ceil_div(n.B, cuda::kTileB);
  d.warps = static_cast<int>(std::min<int64_t>(cuda::kWarps, b_tiles));
  const int64_t b_blocks = ceil_div(b_tiles, d.warps);
  TORCH_CHECK_VALUE(b_blocks <= 65535 && d.n_groups <= 65535, op,
                    ": too large for the CUDA kernels' grid: B = ", n.B, ", N_out = ", n.N_out);
  plan_chunks(d, cuda::kPassBlocksPerSM * std::max(1, cuda::kWarps / d.warps),
              b_blocks * d.n_groups);
  return d;
}

// `count` tiled arrays (V, V_prev, gs: cuda::tiled_offset), [count, tiled_elems]. Their
// padding past B and D_out must read as zeros, so a padded layout starts zeroed; without
// padding the kernels write every element before any is read.
inline at::Tensor tiled_scratch(const Dims& d, int64_t count, const at::TensorOptions& options) {
  const bool padded = d.B % cuda::kTileB != 0 || d.D_out % cuda::kTileD != 0;
  return padded ? at::zeros({count, cuda::tiled_elems(d)}, options)
                : cuda::scratch({count, cuda::tiled_elems(d)}, options);
}

// `count` arrays in the row layout of the row passes (cuda::row_layout_offset), [count,
// row_layout_elems], zeroed where they have padding (past B or D_out), which must read as zeros.
inline at::Tensor row_scratch(const Dims& d, int64_t count, const at::TensorOptions& options) {
  const bool padded = d.B % cuda::kRowsB != 0 || d.D_out % 8 != 0;
  return padded ? at::zeros({count, cuda::row_layout_elems(d)}, options)
                : cuda::scratch({count, cuda::row_layout_elems(d)}, options);
}

// The shared memory a kernel's plan may take per block (bytes): 200 KB, which the H100
// (227 KB) measured these plans with, or what a block may have where that is less (163 KB on
// an A100, 99 KB at compute capability 8.6, 8.9 and 12.0; or CAPSROUTE_MAX_SMEM_KB: see
// cuda::block_smem). Every plan below stages less where less fits.
inline size_t pass_smem() {
  return std::min<size_t>(200 * 1024, cuda::block_smem(cuda::device_info()));
}

// Shared memory of a pass (bytes), deciding what is staged there (at most pass_smem()
// bytes): W[i] (with fragments, which the launch chooses only where they fit, always), then
// V (and gs) tiles if they fit beside it.
template <typename T, typename acc_t>
size_t plan_pass_smem(Dims& d, bool computed, bool fragments, int tiles) {
  const size_t limit = pass_smem();
  // Without fragments: two buffers of one group's rows of W[i], in at most half the space.
  d.w_shared = computed && (fragments || 2 * size_t(cuda::widest_group_cols(d) * d.D_in) *
                                                 sizeof(T) <= limit / 2);
  d.tiles_shared = true;
  if (cuda::pass_layout<T, acc_t>(d, tiles, fragments).end > limit) d.tiles_shared = false;
  return cuda::pass_layout<T, acc_t>(d, tiles, fragments).end;
}

// Whether a kernel can stage W[i] in shared memory (with fragments: also as the matrix
// units' operands, FragmentSource), V and gs tiles left out: `layout(d, fragments)` is the
// kernel's shared-memory layout (pass_layout, weight_grad_layout).
template <typename Layout>
bool staged_fits(Dims d, bool fragments, Layout&& layout) {
  d.w_shared = true;
  d.tiles_shared = false;
  return layout(d, fragments).end <= pass_smem();
}

// One warp per (b, j) output capsule.
inline dim3 capsule_grid(const Dims& d) { return dim3(static_cast<unsigned>(ceil_div(d.B * d.N_out, 8))); }

// launch(vw) with the values per lane of the per-capsule kernels that sum partials: a 16-byte
// vector (cuda::kCapsuleVec) where D_out is a multiple of it, else 1.
template <typename acc_t, typename Launch>
void with_capsule_vec(const Dims& d, Launch&& launch) {
  constexpr int kVec = cuda::kCapsuleVec<acc_t>;
  if (d.D_out % kVec == 0)
    launch(std::integral_constant<int, kVec>{});
  else
    launch(std::integral_constant<int, 1>{});
}

// launch(source) with the source a kernel makes its predictions from: for dynamic_routing in
// float32 and the half types, W[i] staged as the matrix units' operands (FragmentSource, with
// its chunk count compiled in where D_in <= 8) if fits() says they fit in shared memory;
// otherwise (float64, route, very wide D_in) src itself.
template <typename Src, typename Fits, typename Launch>
void launch_with_source(const Src& src, const Dims&, Fits&&, Launch&& launch) {
  launch(src);
}
template <typename T, typename Fits, typename Launch>
void launch_with_source(const cuda::WeightSource<T>& src, const Dims& d, Fits&& fits,
                        Launch&& launch) {
  if constexpr (!std::is_same<T, double>::value) {
    if (fits()) {
      if (d.k_chunks == 1)
        launch(cuda::FragmentSource<T, 1>{src.u, src.W});
      else
        launch(cuda::FragmentSource<T, 0>{src.u, src.W});
      return;
    }
  }
  launch(src);
}

// Whether a group's forward and gradient passes walk the predictions once where launch_pass
// can (routing_pass_kernel's kGiven), unless CAPSROUTE_GROUP_WALK=0, which keeps the two
// walks that one group takes: a switch for measuring one against the other in the same
// session.
inline bool group_walk() { return env_number("CAPSROUTE_GROUP_WALK", "0 or 1") != 0; }

// One pass over the input capsules (see routing_pass_kernel); `tiles` tiled arrays staged (V,
// and gs for the gradient and for the statistics with their sums).
template <cuda::Pass kPass, int DT, typename Src, typename T, typename acc_t>
void launch_pass(const Src& src, Dims d, const cuda::State<acc_t>& st, acc_t* partial,
                 T* c_out, cudaStream_t stream) {
  const int tiles = cuda::pass_tiles<kPass>(st);
  const dim3 grid(d.n_chunks, static_cast<unsigned>(ceil_div(ceil_div(d.B, cuda::kTileB), d.warps)),
                  d.n_groups);
  launch_with_source(
      src, d,
      [&] {
        return staged_fits(d, true, [&](const Dims& e, bool f) {
          return cuda::pass_layout<T, acc_t>(e, tiles, f);
        });
      },
      [&](auto source) {
        using S = decltype(source);
        const size_t smem = plan_pass_smem<T, acc_t>(d, S::kComputed, S::kFragments, tiles);
        // With several groups the forward's and gradient passes have the statistics given
        // (st.stats, st.cg): from staged operands they walk the predictions once. Not the
        // gradient pass of wider layers (D_out > 16 or D_in > 8): with the predictions of a
        // batch of capsules kept through its sums it spilled 96-276 bytes (ptxas, float).
        constexpr bool kWalk =
            S::kFragments && (kPass == cuda::Pass::kForward ||
                              (kPass == cuda::Pass::kGradient && DT == 1 && S::kChunks == 1));
        if constexpr (kWalk) {
          if (d.n_groups > 1 && group_walk())
            return cuda::launch(cuda::routing_pass_kernel<kPass, DT, S, T, true>, grid,
                                d.warps * 32, smem, stream, source, d, st, partial, c_out);
        }
        cuda::launch(cuda::routing_pass_kernel<kPass, DT, S, T>, grid, d.warps * 32, smem,
                     stream, source, d, st, partial, c_out);
      });
}

// Several groups of output capsules: the softmax statistics of iteration t over all capsules
// into `stats`, and with `cg` the softmax backward's sums (from st.gs and st.grad_c): each
// group's by a pass (Pass::kStats), merged by merge_group_stats_kernel. st reads V (and gs)
// from global memory.
template <int DT, typename T, typename Src, typename acc_t>
void launch_group_stats(const Src& src, const Dims& d, cuda::State<acc_t> st, acc_t* stats,
                        acc_t* cg, const at::TensorOptions& acc_opts, cudaStream_t stream) {
  if (cg == nullptr) st.gs = st.grad_c = nullptr;  // (the pass makes the sums where gs is given)
  auto part =
      cuda::scratch({d.n_groups * d.B * d.N_in * cuda::stats_values(cg != nullptr)}, acc_opts);
  launch_pass<cuda::Pass::kStats, DT>(src, d, st, aptr<acc_t>(part), static_cast<T*>(nullptr),
                                      stream);
  cuda::launch(cuda::merge_group_stats_kernel<acc_t>,
               dim3(static_cast<unsigned>(ceil_div(d.B * d.N_in, 256))), 256, 0, stream, d,
               aptr<acc_t>(part), stats, cg);
}

// Whether the forward's passes and the backward's gradient passes run on row_pass_kernel:
// dynamic_routing in float32 at the sizes it supports (cuda::row_pass_supported). On an H100
// at B = 128 (3245b3d) they took a float32 forward from 113.5 to 105.8 µs of GPU time and a
// B = 512 one from 371 to 286, but a bfloat16 forward from 90.5 to 101.1 µs (routing_pass_kernel
// reads half the bytes of W's operands there; the row pass converts to float32 as it loads),
// so the half types keep routing_pass_kernel unless asked. CAPSROUTE_ROW_PASS=1 asks for the
// row passes in the half types too, 0 keeps routing_pass_kernel's passes for every dtype (as
// every other size has them): switches for measuring one against the other.
template <typename Src, typename T>
constexpr bool kRowSource = std::is_same<std::remove_cv_t<Src>, cuda::WeightSource<T>>::value &&
                            !std::is_same<T, double>::value;
// Whether the row passes' lanes read W[i]'s operands from global memory themselves
// (row_pass_kernel's kDirect: no block barrier in the walk) instead of the block staging
// them: CAPSROUTE_ROW_DIRECT=1. Off by default until a GPU has timed it against the staged
// form that the H100 measured.
inline bool row_direct() { return env_number("CAPSROUTE_ROW_DIRECT", "0 or 1") > 0; }

// Row tiles of 16 batch elements in a row pass's block (2 warps each): up to 4.
inline int row_block_tiles(const Dims& d) {
  return static_cast<int>(std::min<int64_t>(4, ceil_div(d.B, cuda::kRowsB)));
}

// kPass: the largest of the passes to run, kForward for the forward's (kFirst stages no V),
// kGradient for the backward's; where its shared memory does not fit the device (the MNIST
// layer's gradient pass takes 97 KB), routing_pass_kernel runs them instead. (Clusters only
// raise a row layout to its sums, which are no more than kForward's V.)
template <cuda::Pass kPass, typename Src, typename T>
bool use_row_pass(const Dims& d) {
  if constexpr (kRowSource<Src, T>) {
    if (!cuda::row_pass_supported(d)) return false;
    if (cuda::row_layout<kPass, T>(d, row_block_tiles(d), row_direct()).end > pass_smem())
      return false;
    const int64_t asked = env_number("CAPSROUTE_ROW_PASS", "0 or 1");
    return asked < 0 ? std::is_same<T, float>::value : asked != 0;
  }
  return false;
}

// CAPSROUTE_ROW_CLUSTER=n (2, 4 or 8): the row passes' blocks along N_in in thread-block
// clusters of n, which add up their sums on chip (row_pass_kernel) and write one partial sum
// per cluster, n times fewer bytes for the passes to write and finish_iteration or
// sweep_step to read (at B = 128, 10.5 MB a pass without). Unset or 1: no clusters. Off by
// default until a GPU has timed it; float32 only (the row passes' default dtype); clusters
// need compute capability 9.0. The chunks are rounded up to whole clusters (the blocks past
// N_in add zeros).
inline int row_cluster() {
  const int64_t n = env_number("CAPSROUTE_ROW_CLUSTER", "1, 2, 4 or 8");
  TORCH_CHECK_VALUE(n < 0 || n == 1 || n == 2 || n == 4 || n == 8,
                    "capsroute: CAPSROUTE_ROW_CLUSTER must be 1, 2, 4 or 8, but is ", n);
  TORCH_CHECK_VALUE(n <= 1 || cuda::has_clusters(cuda::device_info()),
                    "capsroute: CAPSROUTE_ROW_CLUSTER=", n,
                    " needs a GPU with thread-block clusters (compute capability 9.0 or newer)");
  return n <= 1 ? 1 : static_cast<int>(n);
}

// The row passes' blocks: up to 4 row tiles of 16 batch elements, 2 warps each; the chunks of
// input capsules are planned for them (plan_chunks), in d, for two blocks per multiprocessor
// at every B. Where a block has fewer than 8 warps (B <= 48) that leaves warps idle, but
// fewer chunks mean fewer partial sums to add: on an H100 at B = 32 (3245b3d) two blocks of 4
// warps took the forward's GPU time to 60.6 µs against 65.0 with four (the plan before), 61.4
// with one and 82.2 with eight. For measuring the chunk count's effect,
// CAPSROUTE_ROW_BLOCKS_PER_SM=n plans for n blocks.
inline dim3 plan_row_pass(Dims& d, int& threads, bool float32) {
  const int per_block = row_block_tiles(d);
  const int64_t b_blocks = ceil_div(ceil_div(d.B, cuda::kRowsB), per_block);
  TORCH_CHECK_VALUE(b_blocks <= 65535,
                    "dynamic_routing: too large for the CUDA kernels' grid: B = ", d.B);
  const char* name = "CAPSROUTE_ROW_BLOCKS_PER_SM";
  const int64_t asked = env_number(name, "a number of blocks, 1 or more");
  TORCH_CHECK_VALUE(asked != 0, "capsroute: ", name, " must be a number of blocks, 1 or more");
  plan_chunks(d, asked > 0 ? asked : cuda::kPassBlocksPerSM, b_blocks);
  d.cluster = float32 ? row_cluster() : 1;
  if (d.cluster > 1) {
    d.partials = static_cast<int>(ceil_div(d.n_chunks, d.cluster));
    d.n_chunks = d.partials * d.cluster;
  }
  threads = 64 * per_block;
  return dim3(static_cast<unsigned>(d.n_chunks), static_cast<unsigned>(b_blocks));
}

template <cuda::Pass kPass, typename T>
void launch_row_pass(const cuda::WeightSource<T>& src, const Dims& d, dim3 grid, int threads,
                     const cuda::RowState& st, float* partial, T* c_out, cudaStream_t stream) {
  const bool direct = row_direct();
  const size_t smem = cuda::row_layout<kPass, T>(d, threads / 64, direct).end;
  auto go = [&](auto kDT8) {
    constexpr int DT8 = decltype(kDT8)::value;
    auto kernel = direct ? cuda::row_pass_kernel<kPass, DT8, T, true, false>
                         : cuda::row_pass_kernel<kPass, DT8, T, false, false>;
    if constexpr (std::is_same<T, float>::value) {  // clusters: float32 only (plan_row_pass)
      if (d.cluster > 1)
        kernel = direct ? cuda::row_pass_kernel<kPass, DT8, T, true, true>
                        : cuda::row_pass_kernel<kPass, DT8, T, false, true>;
    }
    cuda::launch_clusters(kernel, grid, threads, smem, stream, d.cluster, src.u, src.W, d, st,
                          partial, c_out);
  };
  if (cuda::row_dt8(d) == 2)
    go(std::integral_constant<int, 2>{});
  else
    go(std::integral_constant<int, 1>{});
}

// Whether the forward's first iteration makes its sums as one matrix product
// (first_sums_kernel) instead of a pass: dynamic_routing in float32 and the half types where
// D_in % 8 == 0 and u and W are 16-byte aligned (Dims::rows8), unless the first iteration is
// the last and its couplings are returned (`c_out`: the passes write them).
// CAPSROUTE_FIRST_SUMS=0 keeps the pass, for measuring one against the other.
template <typename Src, typename T>
bool use_first_sums(const Dims& d, int64_t iterations, bool c_out) {
  if constexpr (kRowSource<Src, T>)
    return d.rows8 && !(iterations == 1 && c_out) && ceil_div(d.J, cuda::kFirstCols) <= 65535 &&
           env_number("CAPSROUTE_FIRST_SUMS", "0 or 1") != 0;
  return false;
}

// first_sums_kernel's grid, its chunks of input capsules planned in f (a copy of the forward's
// dims): as many as fit one wave of two blocks per multiprocessor beside the blocks of rows
// and columns (rounded down: a block past the wave would double the time), but no more than
// the forward's scratch holds partial sums (f.partials).
inline dim3 plan_first_sums(Dims& f) {
  const int64_t m_blocks = ceil_div(f.B, cuda::kFirstRows);
  const int64_t n_blocks = ceil_div(f.J, cuda::kFirstCols);
  const int64_t slots = int64_t(cuda::device_info().multiprocessors) * cuda::kPassBlocksPerSM;
  set_chunks(f, std::clamp<int64_t>(slots / (m_blocks * n_blocks), 1,
                                    std::min<int64_t>(f.N_in, f.partials)));
  return dim3(static_cast<unsigned>(f.n_chunks), static_cast<unsigned>(m_blocks),
              static_cast<unsigned>(n_blocks));
}

template <int DT, typename Src, typename T>
void forward(const Src& src, const Dims& dims, int64_t iterations, double eps, const T* bias,
             T* v, T* c, typename cuda::Scalar<T>::acc* s, const at::TensorOptions& acc_opts) {
  using acc_t = typename cuda::Scalar<T>::acc;
  cudaStream_t stream = cuda::current_stream();
  Dims d = dims;
  const bool rows = use_row_pass<cuda::Pass::kForward, Src, T>(d);
  int row_threads = 0;
  const dim3 row_grid =
      rows ? plan_row_pass(d, row_threads, std::is_same<T, float>::value) : dim3();
  // Iteration 1 as one matrix product, its chunks planned in f.
  const bool first_sums = use_first_sums<Src, T>(d, iterations, c != nullptr);
  Dims f = d;
  const dim3 first_grid = first_sums ? plan_first_sums(f) : dim3();
  // Written first by iteration 1's finish.
  auto V = rows ? row_scratch(d, 1, acc_opts) : tiled_scratch(d, 1, acc_opts);
  auto partial = cuda::scratch({d.partials, d.B, d.J}, acc_opts);
  const bool groups = d.n_groups > 1;
  const at::Tensor stats =
      groups ? cuda::scratch({d.B * d.N_in * 2}, acc_opts) : at::Tensor();
  for (int64_t t = 1; t <= iterations; ++t) {
    const bool last = t == iterations;
    cuda::State<acc_t> st{aptr<acc_t>(V), nullptr, nullptr, t == 1, 0, d.N_out};
    if (groups && t > 1) {
      launch_group_stats<DT, T>(src, d, st, aptr<acc_t>(stats), static_cast<acc_t*>(nullptr),
                                acc_opts, stream);
      st.stats = aptr<acc_t>(stats);
    }
    if (t == 1 && first_sums) {
      if constexpr (kRowSource<Src, T>)
        cuda::launch(cuda::first_sums_kernel<T>, first_grid, cuda::kThreads,
                     2 * cuda::first_buffer_bytes<T>(), stream, src.u, src.W, f,
                     aptr<acc_t>(partial));
    } else if (rows) {
      if constexpr (kRowSource<Src, T>) {
        cuda::RowState rs;
        rs.V = aptr<acc_t>(V);
        if (t == 1)
          launch_row_pass<cuda::Pass::kFirst>(src, d, row_grid, row_threads, rs,
                                              aptr<acc_t>(partial), last ? c : nullptr, stream);
        else
          launch_row_pass<cuda::Pass::kForward>(src, d, row_grid, row_threads, rs,
                                                aptr<acc_t>(partial), last ? c : nullptr, stream);
      }
    } else if (t == 1) {
      launch_pass<cuda::Pass::kFirst, DT>(src, d, st, aptr<acc_t>(partial), last ? c : nullptr,
                                          stream);
    } else {
      launch_pass<cuda::Pass::kForward, DT>(src, d, st, aptr<acc_t>(partial),
                                            last ? c : nullptr, stream);
    }
    with_capsule_vec<acc_t>(d, [&](auto vw) {
      cuda::launch(cuda::finish_iteration_kernel<decltype(vw)::value, T>, capsule_grid(d), 256,
                   0, stream, t == 1 && first_sums ? f : d, aptr<acc_t>(partial), bias, eps,
                   t == 1, rows, aptr<acc_t>(V),
                   s + (t - 1) * d.B * d.J, last ? v : nullptr);
    });
  }
}

// Whether the recomputing last pass parks the rows of V^(t-1) and gs^(t) that it reads twice
// (weight_grad_kernel's kPark, float32 accumulation): where every iteration carries gradient
// (without detach each row of t >= 2 is read for the dot products and again for g_uh; with
// detach, once) and the parked layout fits the block's shared memory. That is all a block may
// have (block_smem: 227 KB on an H100, where the MNIST layer's and the 32768 x 64 shape's
// take 217 and 220 KB), not pass_smem()'s 200 KB, which leaves the L1 cache room: this pass
// gains nothing from it (Nsight Compute: 3.7% L1 hits at the 32768 x 64 shape, 861bf4b).
// CAPSROUTE_PARK_ROWS=0 turns it off, for measuring one form against the other.
template <typename T>
bool park_rows(const Dims& d, bool fragments, int64_t t_min, int64_t iterations) {
  using acc_t = typename cuda::Scalar<T>::acc;
  if (t_min > 1 || iterations < 2) return false;
  if (env_number("CAPSROUTE_PARK_ROWS", "0 or 1") == 0) return false;
  return cuda::weight_grad_layout<T, acc_t>(d, fragments, false, true).end <=
         cuda::block_smem(cuda::device_info());
}

// CAPSROUTE_CAPSULE_GRAD, the switch of the kept last pass with an input capsule per warp (for
// measuring it against weight_grad_kernel's capsule per block): 0 turns it off, n >= 1 asks
// for it with n warps a block, unset (-1) leaves the choice to capsule_grad_warps.
inline int64_t capsule_grad_asked() {
  return env_number("CAPSROUTE_CAPSULE_GRAD", "0 or a number of warps");
}

// Input capsules (warps) per block of weight_grad_capsules_kernel, the last pass with kept
// couplings that shares the batch tiles' rows across capsules, or 0 where weight_grad_kernel
// runs instead: float32 accumulation with W's rows in 16-byte pieces (rows8), and enough input
// capsules that one block per multiprocessor has at least kCapsuleWarpsMin of them, with its
// shared memory within pass_smem(). For measuring, CAPSROUTE_CAPSULE_GRAD=0 keeps
// weight_grad_kernel, and CAPSROUTE_CAPSULE_GRAD=n asks for n warps per block (any n from 1,
// fewer where shared memory needs it).
template <typename T, typename acc_t>
int capsule_grad_warps(const Dims& d, int64_t iterations) {
  if (!std::is_same<acc_t, float>::value || !d.rows8) return 0;
  const int64_t asked = capsule_grad_asked();
  if (asked == 0) return 0;
  int warps = static_cast<int>(std::clamp<int64_t>(
      asked > 0 ? asked : ceil_div(d.N_in, cuda::device_info().multiprocessors), 1,
      cuda::kCapsuleWarpsMax));
  const int least = asked > 0 ? 1 : cuda::kCapsuleWarpsMin;
  while (warps >= least &&
         cuda::capsule_grad_layout<T>(d, static_cast<int>(iterations), warps).end > pass_smem())
    --warps;
  return warps >= least ? warps : 0;
}

// Whether dynamic_routing's last pass can read couplings that the gradient passes keep, on
// this device, given capsule_grad_warps: where weight_grad_capsules_kernel runs or
// weight_grad_kernel's kept form fits with W[i] unstaged (104 KB in float32: more than the
// 99 KB of compute capability 8.6, 8.9 and 12.0, where the last pass recomputes them).
// (route's last pass always can: it takes no shared memory.)
template <typename T>
bool kept_pass_fits(const Dims& d, int capsule_warps) {
  using acc_t = typename cuda::Scalar<T>::acc;
  Dims unstaged = d;
  unstaged.w_shared = false;
  return capsule_warps > 0 ||
         cuda::weight_grad_layout<T, acc_t>(unstaged, false, true).end <= pass_smem();
}

// What the backward sweep leaves for the last pass, per iteration t at t - 1: V_prev
// (V^(t-1)) and gs (dL/ds^(t)), tiled, in one allocation `tiled` [2 r, tiled_elems]: V_prev's
// r rows, then gs's; with several groups of output capsules also the softmax statistics and
// sums of launch_group_stats, [r, B * N_in * 2] and [r, B * N_in]; the kept couplings of
// t >= 2, [r - 1, 2, kept_plane], where the gradient passes keep them. Undefined where not
// made: an allocation, even of nothing, costs host time on every call.
struct SweepResult {
  at::Tensor tiled, stats, cg, kept;
  int64_t iterations() const { return tiled.size(0) / 2; }
  at::Tensor gs() const { return tiled.narrow(0, iterations(), iterations()); }
  template <typename acc_t>
  acc_t* V_prev_data() const { return aptr<acc_t>(tiled); }
  template <typename acc_t>
  acc_t* gs_data() const { return V_prev_data<acc_t>() + iterations() * tiled.size(1); }
  template <typename acc_t>
  cuda::Sweep<acc_t> view(const at::Tensor& grad_c, int64_t t_min, bool detach) const {
    return {V_prev_data<acc_t>(), gs_data<acc_t>(), aptr<acc_t>(grad_c),
            static_cast<int>(t_min), static_cast<int>(iterations()), detach,
            aptr<acc_t>(stats), aptr<acc_t>(cg), aptr<acc_t>(kept)};
  }
};

// The backward sweep up to the last pass (see sweep_step_kernel). `keep_fits`: whether the
// last pass can read kept couplings (kept_pass_fits).
template <int DT, typename Src, typename T>
SweepResult sweep(const Src& src, const Dims& dims, int64_t iterations, int64_t t_min, double eps,
                  const at::Tensor& grad_v, const at::Tensor& grad_c, const at::Tensor& s,
                  bool keep_fits) {
  using acc_t = typename cuda::Scalar<T>::acc;
  cudaStream_t stream = cuda::current_stream();
  // s is [r, B, N_out * D_out]; V_prev and gs are tiled, tiled_elems per iteration.
  Dims d = dims;
  const int64_t tiled = cuda::tiled_elems(d), per_t = d.B * d.N_in;
  // The gradient passes as row passes (see forward): they read V_prev and gs in the row
  // layout, written beside the tiled arrays that the last pass reads.
  const bool rows = t_min < iterations && use_row_pass<cuda::Pass::kGradient, Src, T>(d);
  int row_threads = 0;
  const dim3 row_grid =
      rows ? plan_row_pass(d, row_threads, std::is_same<T, float>::value) : dim3();
  const int64_t row_elems = rows ? cuda::row_layout_elems(d) : 0;
  // V and gs in the row layout, one allocation [2 r, row_elems]: V's r rows, then gs's.
  const at::Tensor rows_pair = rows ? row_scratch(d, 2 * iterations, s.options()) : at::Tensor();
  acc_t* const V_rows_ = aptr<acc_t>(rows_pair);
  acc_t* const gs_rows_ = rows ? V_rows_ + iterations * row_elems : nullptr;
  SweepResult out;
  // gs is written for the iterations t_min .. r that the last pass and grad_bias read.
  out.tiled = tiled_scratch(d, 2 * iterations, s.options());
  acc_t* const V_prev_ = out.V_prev_data<acc_t>();
  acc_t* const gs_ = out.gs_data<acc_t>();
  const bool groups = d.n_groups > 1;
  if (groups) {
    out.stats = cuda::scratch({iterations * per_t * 2}, s.options());
    out.cg = cuda::scratch({iterations * per_t}, s.options());
  }
  // The gradient passes (t = r .. 2, all of them only without detach) keep c and the logit
  // gradient where that fits the budget.
  const int64_t kept_elems = 2 * (iterations - 1) * cuda::kept_plane(d);
  const bool keep = t_min == 1 && iterations > 1 &&
                    kept_elems * int64_t(sizeof(acc_t)) <= coupling_cache_bytes() && keep_fits;
  if (keep) out.kept = cuda::scratch({kept_elems}, s.options());
  auto G = cuda::scratch({d.B, d.J}, s.options());  // written first by the first sweep step
  const at::Tensor partial =
      t_min < iterations ? cuda::scratch({d.partials, d.B, d.J}, s.options()) : at::Tensor();
  const acc_t* s_ = aptr<acc_t>(s);
  // Iteration t's step, with the partials of the pass for t + 1 (none for t = r).
  // (The first, t = r, also writes the running sums V_prev and V_rows.)
  auto sweep_step = [&](const acc_t* parts, int n_parts, int64_t t, const T* gv) {
    const bool first = t == iterations;
    with_capsule_vec<acc_t>(d, [&](auto vw) {
      cuda::launch(cuda::sweep_step_kernel<decltype(vw)::value, T>, capsule_grid(d), 256, 0,
                   stream, d, parts, n_parts, s_, static_cast<int>(t),
                   static_cast<int>(iterations), gv, eps, aptr<acc_t>(G), gs_ + (t - 1) * tiled,
                   rows ? gs_rows_ + (t - 1) * row_elems : nullptr, first ? V_prev_ : nullptr,
                   first ? V_rows_ : nullptr);
    });
  };
  sweep_step(nullptr, 0, iterations, static_cast<const T*>(grad_v.data_ptr()));
  // Iteration t's state, with its group statistics made first (t >= 2; with cg when its
  // softmax is differentiated, i.e. without detach).
  auto state = [&](int64_t t) {
    cuda::State<acc_t> st{V_prev_ + (t - 1) * tiled, gs_ + (t - 1) * tiled,
                          t == iterations ? aptr<acc_t>(grad_c) : nullptr, false, 0, d.N_out};
    if (groups) {
      acc_t* stats = aptr<acc_t>(out.stats) + (t - 1) * per_t * 2;
      acc_t* cg = t > t_min ? aptr<acc_t>(out.cg) + (t - 1) * per_t : nullptr;
      launch_group_stats<DT, T>(src, d, st, stats, cg, s.options(), stream);
      st.stats = stats;
      st.cg = cg;
    }
    return st;
  };
  for (int64_t t = iterations; t > t_min; --t) {
    cuda::State<acc_t> st = state(t);
    if (keep) st.kept = aptr<acc_t>(out.kept) + cuda::kept_offset(d, t);
    if (rows) {
      if constexpr (kRowSource<Src, T>) {
        cuda::RowState rs;
        rs.V = V_rows_ + (t - 1) * row_elems;  // V^(t-1), as st.V
        rs.gs = gs_rows_ + (t - 1) * row_elems;
        rs.grad_c = st.grad_c;
        rs.kept = st.kept;
        launch_row_pass<cuda::Pass::kGradient>(src, d, row_grid, row_threads, rs,
                                               aptr<acc_t>(partial), static_cast<T*>(nullptr),
                                               stream);
      }
    } else {
      launch_pass<cuda::Pass::kGradient, DT>(src, d, st, aptr<acc_t>(partial),
                                             static_cast<T*>(nullptr), stream);
    }
    sweep_step(aptr<acc_t>(partial), d.partials, t - 1, nullptr);
  }
  if (t_min > 1) state(t_min);  // detach: the last pass needs c^(r) only
  return out;
}

// ---------------------------------------------------------------------------------------
// Op entry points.


// Rows of u and W load as 16-byte vectors when D_in is a multiple of 8 and both are aligned.
template <typename T>
bool rows8(const cuda::WeightSource<T>& src, int64_t D_in) {
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return D_in % 8 == 0 && aligned(src.u) && aligned(src.W);
}
template <typename T>
bool rows8(const cuda::GivenSource<T>&, int64_t) {
  return false;
}

template <typename F>
void dispatch_dim_tiles(const char* op, int64_t D_out, F&& f) {
  if (dim_tiles(op, D_out) == 1)
    f(std::integral_constant<int, 1>{});
  else
    f(std::integral_constant<int, 2>{});
}

inline at::Tensor grad_bias_of(const at::Tensor& gs, int64_t t_min, int64_t iterations,
                               const Dims& d, at::ScalarType dtype) {
  // The sum over the iterations that carry gradient and over the batch, of gs tiled:
  // [t][batch tile][N_out][DT][g][t][dim half][batch half] (cuda::tiled_offset), batch
  // element 8 tile + 2 t + half, dim 16 DT + 8 half + g.
  const int64_t DT = cuda::row_tiles(d);
  return gs.narrow(0, t_min - 1, iterations - t_min + 1)
      .view({iterations - t_min + 1, ceil_div(d.B, cuda::kTileB), d.N_out, DT, 8, 4, 2, 2})
      .sum(at::IntArrayRef{0, 1, 5, 7})
      .permute({0, 1, 3, 2})
      .reshape({d.N_out, DT * cuda::kTileD})
      .narrow(1, 0, d.D_out)
      .to(dtype)
      .contiguous();  // the narrow keeps the padded row stride where D_out is not whole tiles
}

template <typename scalar_t, typename Src>
void forward_op(const char* op, const Src& src, const RoutingSizes& n, int64_t iterations,
                bool leaky, double eps, const c10::optional<at::Tensor>& bias, at::Tensor& v,
                at::Tensor& c, at::Tensor& s) {
  using T = dev_t<scalar_t>;
  using acc_t = typename cuda::Scalar<T>::acc;
  Dims d = make_dims(op, n, leaky);
  d.rows8 = rows8(src, n.D_in);
  dispatch_dim_tiles(op, n.D_out, [&](auto dt) {
    forward<decltype(dt)::value>(src, d, iterations, eps,
                                 bias.has_value() ? dptr<scalar_t>(*bias) : nullptr,
                                 dptr<scalar_t>(v), dptr<scalar_t>(c), s.data_ptr<acc_t>(),
                                 s.options());
  });
}

// v, c (possibly empty) and s are allocated by the caller; B > 0.
template <typename scalar_t>
void dynamic_routing_forward(const at::Tensor& u, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, const RoutingSizes& n,
                             int64_t iterations, bool leaky, double eps, at::Tensor& v,
                             at::Tensor& c, at::Tensor& s) {
  const cuda::WeightSource<dev_t<scalar_t>> src{dptr<scalar_t>(u), dptr<scalar_t>(weight)};
  forward_op<scalar_t>("capsroute.dynamic_routing", src, n, iterations, leaky, eps, bias, v, c, s);
}

template <typename scalar_t>
void route_forward(const at::Tensor& u_hat, const c10::optional<at::Tensor>& bias,
                   const RoutingSizes& n, int64_t iterations, bool leaky, double eps,
                   at::Tensor& v, at::Tensor& c, at::Tensor& s) {
  const cuda::GivenSource<dev_t<scalar_t>> src{dptr<scalar_t>(u_hat)};
  forward_op<scalar_t>("capsroute.route", src, n, iterations, leaky, eps, bias, v, c, s);
}

// Gradient outputs are allocated by the caller; B > 0.
template <typename scalar_t>
void dynamic_routing_backward(const BackwardInputs& in, const at::Tensor& u,
                              const at::Tensor& weight, const RoutingSizes& n,
                              int64_t iterations, bool leaky, bool detach, double eps,
                              bool has_bias, at::Tensor& grad_u, at::Tensor& grad_weight,
                              at::Tensor& grad_bias) {
  const char* op = "capsroute.dynamic_routing_backward";
  using T = dev_t<scalar_t>;
  using acc_t = typename cuda::Scalar<T>::acc;
  const int64_t t_min = detach ? iterations : 1;
  const cuda::WeightSource<T> src{dptr<scalar_t>(u), dptr<scalar_t>(weight)};
  Dims d = make_dims(op, n, leaky);
  d.rows8 = rows8(src, n.D_in);
  // The kept last pass with a capsule per warp, where it runs (0: weight_grad_kernel).
  const int capsule_warps = capsule_grad_warps<T, acc_t>(d, iterations);
  dispatch_dim_tiles(op, n.D_out, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    const SweepResult sr =
        sweep<DT, decltype(src), T>(src, d, iterations, t_min, eps, in.grad_v, in.grad_c, in.s,
                                    kept_pass_fits<T>(d, capsule_warps));
    if (has_bias) grad_bias = grad_bias_of(sr.gs(), t_min, iterations, d, u.scalar_type());
    // With one group of output capsules the last pass writes grad_u itself, in its dtype;
    // with several, each group's part in the accumulation type, added up below.
    const bool direct = d.n_groups == 1;
    const at::Tensor grad_u_part =
        direct ? at::Tensor() : cuda::scratch({d.n_groups, n.B, n.N_in, n.D_in}, in.s.options());
    acc_t* const grad_u_acc = aptr<acc_t>(grad_u_part);
    T* const grad_u_out = direct ? dptr<scalar_t>(grad_u) : nullptr;
    const dim3 grid(static_cast<unsigned>(n.N_in), d.n_groups, static_cast<unsigned>(ceil_div(n.D_in, 8)));
    const cuda::Sweep<acc_t> sw = sr.view<acc_t>(in.grad_c, t_min, detach);
    // With the couplings kept, the last pass makes no predictions (see weight_grad_kernel):
    // it reads W[i] as it is. W[i]'s rows are staged in shared memory where they fit beside
    // the tiles (always with operands).
    const bool kept = sw.kept != nullptr;
    auto layout = [kept](const Dims& e, bool f, bool park = false) {
      return cuda::weight_grad_layout<T, acc_t>(e, f, kept, park);
    };
    auto last_pass = [&](auto source, auto kept_t) {
      using S = decltype(source);
      constexpr bool kKept = decltype(kept_t)::value;
      d.w_shared = staged_fits(d, S::kFragments, layout);
      auto go = [&](auto park_t) {
        constexpr bool kPark = decltype(park_t)::value;
        cuda::launch(cuda::weight_grad_kernel<DT, S, T, kKept, kPark>, grid,
                     cuda::weight_grad_warps<acc_t>() * 32,
                     layout(d, S::kFragments, kPark).end,
                     cuda::current_stream(), source, d, sw, grad_u_acc, grad_u_out,
                     dptr<scalar_t>(grad_weight));
      };
      if constexpr (!kKept && std::is_same<acc_t, float>::value) {
        if (park_rows<T>(d, S::kFragments, t_min, iterations)) return go(std::true_type{});
      }
      go(std::false_type{});
    };
    if (kept && capsule_warps > 0) {
      if constexpr (std::is_same<acc_t, float>::value) {
        const dim3 blocks(static_cast<unsigned>(ceil_div(n.N_in, capsule_warps)), d.n_groups,
                          grid.z);
        auto go = [&](auto kR) {
          cuda::launch(cuda::weight_grad_capsules_kernel<DT, decltype(kR)::value, T>, blocks,
                       capsule_warps * 32,
                       cuda::capsule_grad_layout<T>(d, static_cast<int>(iterations),
                                                    capsule_warps).end,
                       cuda::current_stream(), src, d, sw, grad_u_acc, grad_u_out,
                       dptr<scalar_t>(grad_weight));
        };
        if (iterations == 3)  // the usual count, compiled in
          go(std::integral_constant<int, 3>{});
        else
          go(std::integral_constant<int, 0>{});
      }
    } else if (kept) {
      last_pass(src, std::true_type{});
    } else {
      launch_with_source(
          src, d, [&] { return staged_fits(d, true, layout); },
          [&](auto source) { last_pass(source, std::false_type{}); });
    }
    // With several groups of output capsules their contributions to grad_u are added here,
    // in group order: straight into grad_u where it is in the accumulation type (no
    // temporary: 134 MB at the 32768 x 64 shape), else summed, then converted.
    if (direct) return;
    if (grad_u.scalar_type() == grad_u_part.scalar_type())
      at::sum_out(grad_u, grad_u_part, at::IntArrayRef{0});
    else
      grad_u.copy_(grad_u_part.sum(0));
  });
}

template <typename scalar_t>
void route_backward(const BackwardInputs& in, const at::Tensor& u_hat, const RoutingSizes& n,
                    int64_t iterations, bool leaky, bool detach, double eps, bool has_bias,
                    at::Tensor& grad_u_hat, at::Tensor& grad_bias) {
  const char* op = "capsroute.route_backward";
  using T = dev_t<scalar_t>;
  using acc_t = typename cuda::Scalar<T>::acc;
  const Dims d = make_dims(op, n, leaky);
  const int64_t t_min = detach ? iterations : 1;
  const cuda::GivenSource<T> src{dptr<scalar_t>(u_hat)};
  dispatch_dim_tiles(op, n.D_out, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    const SweepResult sr = sweep<DT, decltype(src), T>(src, d, iterations, t_min, eps, in.grad_v,
                                                       in.grad_c, in.s, /*keep_fits=*/true);
    if (has_bias) grad_bias = grad_bias_of(sr.gs(), t_min, iterations, d, u_hat.scalar_type());
    constexpr int kW = cuda::final_warps<acc_t>();
    const dim3 grid(static_cast<unsigned>(ceil_div(n.N_in, kW)), d.n_groups);
    const cuda::Sweep<acc_t> sw = sr.view<acc_t>(in.grad_c, t_min, detach);
    auto last_pass = [&](auto kept) {
      cuda::launch(cuda::route_grad_kernel<DT, T, decltype(kept)::value>, grid, kW * 32, 0,
                   cuda::current_stream(), src, d, sw, dptr<scalar_t>(grad_u_hat));
    };
    if (sw.kept != nullptr)
      last_pass(std::true_type{});
    else
      last_pass(std::false_type{});
  });
}

// One explicit instantiation per dtype, in csrc/cuda/instantiate_*.cu.
#define CAPSROUTE_INSTANTIATE_CUDA(scalar_t)                                                   \
  template void dynamic_routing_forward<scalar_t>(                                             \
      const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,                  \
      const RoutingSizes&, int64_t, bool, double, at::Tensor&, at::Tensor&, at::Tensor&);      \
  template void route_forward<scalar_t>(const at::Tensor&, const c10::optional<at::Tensor>&,   \
                                        const RoutingSizes&, int64_t, bool, double,            \
                                        at::Tensor&, at::Tensor&, at::Tensor&);                \
  template void dynamic_routing_backward<scalar_t>(                                            \
      const BackwardInputs&, const at::Tensor&, const at::Tensor&, const RoutingSizes&,        \
      int64_t, bool, bool, double, bool, at::Tensor&, at::Tensor&, at::Tensor&);               \
  template void route_backward<scalar_t>(const BackwardInputs&, const at::Tensor&,             \
                                         const RoutingSizes&, int64_t, bool, bool, double,     \
                                         bool, at::Tensor&, at::Tensor&);

}  // namespace cuda_launch
}  // namespace capsroute
