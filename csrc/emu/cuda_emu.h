// A CPU emulation of the parts of CUDA that capsroute's kernels use, so that the CUDA kernels
// (csrc/cuda/routing_kernels.cuh) and their launch sequences (routing_launch.cuh) can be
// compiled by the host compiler and run on a machine without a GPU. It exists to test the
// kernels' logic (indexing, fragment layouts, barriers, reductions) against the reference in
// CI; it says nothing about speed. Built only with -DCAPSROUTE_EMULATE
// (tests/test_cuda_emulation.py).
//
// Model: the blocks of a grid run one after another (a launch with thread-block clusters:
// one cluster after another, its blocks together); the threads of a block (cluster) run as
// fibers (ucontext) on the calling thread, each until it reaches a barrier, so that
// __syncthreads, __syncwarp, the cluster's barrier, shuffles and warp-wide matrix
// instructions behave as on a GPU whose warps and threads interleave at those points. Each
// block has its own dynamic shared memory, which the blocks of its cluster can address
// (cluster_shared); __shared__ variables would become function statics, shared by a
// cluster's blocks, and the kernels have none. Shuffles demand a full warp: a shuffle after
// some lanes of the warp have exited, or a barrier that can never complete, aborts with a
// message instead of returning garbage.
//
// Schedules: by default blocks run in index order and, between barriers, threads in index
// order. CAPSROUTE_EMULATION_SCHEDULE=<seed> (a nonzero integer, read at every launch) runs
// the blocks of each launch in a random order, lets warps run ahead of each other and threads
// go in random orders (run_grid), and lands cp.async copies early or late. Code whose result
// depends on that order reads or writes memory that another thread or block writes with no
// barrier or launch between them (a race): its results differ between schedules, where
// correct code gives bit-identical ones.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cuda/device.h"

// --- language keywords -------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float x) { return __half(x); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }

template <typename A, typename B>
inline auto min(A a, B b) -> std::common_type_t<A, B> {
  return a < b ? a : b;
}
template <typename A, typename B>
inline auto max(A a, B b) -> std::common_type_t<A, B> {
  return a < b ? b : a;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

using cudaStream_t = void*;

namespace capsroute {
namespace emu {

// --- the fiber scheduler of one block -----------------------------------------------------

struct Barrier {  // counts arrivals of the live members of a group (block or warp)
  int alive = 0, arrived = 0;
  uint64_t generation = 0;
};

// The fibers of the running block, or of the running cluster's blocks: fiber f is thread
// f % per_block of the cluster's block f / per_block (its rank).
struct Machine {
  ucontext_t scheduler;
  std::vector<ucontext_t> fibers;
  std::vector<std::vector<char>> stacks;
  std::vector<char> done;
  std::vector<uint3> index;  // per fiber: threadIdx
  int current = 0;
  int per_block = 0;
  bool shuffled = false;  // CAPSROUTE_EMULATION_SCHEDULE: random orders (see the top)
  std::mt19937_64 random;
  uint64_t launches = 0;  // varies the random schedule from launch to launch
  uint64_t events = 0;  // barrier releases and exits: progress, for deadlock detection
  // Per block of the cluster (one of each without clusters): its index, __syncthreads'
  // barrier, the named barriers (bar.sync id, count; id 0 is __syncthreads' own), and its
  // dynamic shared memory.
  std::vector<uint3> blocks;
  std::vector<Barrier> block;
  std::vector<std::array<Barrier, 16>> named;
  std::vector<std::vector<unsigned char>> dynamic_smem;  // the launch's size, then a guard zone
  size_t smem_bytes = 0;  // the launch's size
  Barrier cluster;  // barrier.cluster: every thread of the cluster
  std::vector<Barrier> warps;  // per warp of the cluster (fiber / 32)
  std::vector<std::array<unsigned char, 64>> slots;  // one exchange slot per thread
  // Per thread: asynchronous copies (cp.async) not yet landed: the open group, and the
  // committed groups oldest first.
  struct Copy {
    void* dst;
    const void* src;
    int bytes;
  };
  struct Copies {
    std::vector<Copy> open;
    std::vector<std::vector<Copy>> committed;
  };
  std::vector<Copies> copies;
  std::function<void()> body;
};

inline Machine& machine() {
  static Machine m;
  return m;
}

// The running thread's block within its cluster (0 without clusters).
inline int rank() {
  Machine& m = machine();
  return m.current / m.per_block;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "capsroute CUDA emulation: %s (block %u,%u,%u thread %u)\n", what,
               blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
  std::abort();
}

inline void yield() {
  Machine& m = machine();
  swapcontext(&m.fibers[m.current], &m.scheduler);
}

inline void release(Barrier& b) {
  b.arrived = 0;
  ++b.generation;
  ++machine().events;
}

inline void wait(Barrier& b) {
  const uint64_t gen = b.generation;
  if (++b.arrived == b.alive) {
    release(b);
    return;
  }
  while (b.generation == gen) yield();
}

inline Barrier& my_warp() {
  Machine& m = machine();
  return m.warps[m.current / 32];
}

// cp.async.commit_group and cp.async.wait_group (the copies themselves: cp_async below).
inline void cp_async_commit() {
  auto& c = machine().copies[machine().current];
  c.committed.push_back(std::move(c.open));
  c.open.clear();
}
// cp.async.wait_group n: all but the newest n committed groups have landed.
inline void cp_async_wait(int n) {
  auto& c = machine().copies[machine().current];
  const int land = static_cast<int>(c.committed.size()) - n;
  for (int g = 0; g < land; ++g)
    for (const auto& x : c.committed[g]) std::memcpy(x.dst, x.src, x.bytes);
  if (land > 0) c.committed.erase(c.committed.begin(), c.committed.begin() + land);
}
inline void cp_async_wait_one() { cp_async_wait(1); }
inline void cp_async_wait_all() { cp_async_wait(0); }

// The running thread's asynchronous copies that no wait_group has landed yet land now. On a
// GPU a copy lands at some time after it is issued, whether or not the thread ever waits for
// it; the emulation lands the ones never waited for when the thread arrives at a cluster
// barrier (after which other blocks read its shared memory) or exits. A kernel that leaves a
// copy in flight into memory it then uses for something else finds the copy's bytes there.
inline void land_pending_copies() {
  cp_async_commit();
  cp_async_wait_all();
}

inline void fiber_main() {
  Machine& m = machine();
  m.body();
  land_pending_copies();
  // This thread exits: the barriers it belonged to now wait for one fewer.
  m.done[m.current] = 1;
  ++m.events;
  Barrier& block = m.block[rank()];
  for (Barrier* b : {&block, &my_warp(), &m.cluster}) {
    --b->alive;
    if (b->arrived > 0 && b->arrived == b->alive) release(*b);
  }
}

// bar.sync id, count: waits until `count` threads of the block (whole warps) have arrived at
// named barrier `id`. Threads that exited do not count, as on the hardware: a barrier that a
// thread never reaches is a deadlock, which run_grid reports.
inline void named_barrier(int id, int count) {
  Machine& m = machine();
  if (id <= 0 || id >= static_cast<int>(m.named[rank()].size()) || count <= 0 || count % 32)
    fail("bad named barrier");
  Barrier& b = m.named[rank()][id];
  if (b.arrived == 0) b.alive = count;
  if (b.alive != count) fail("threads meet at a named barrier with different counts");
  wait(b);
}

// Runs `body` as the code of every thread of every block of the grid, in clusters of
// `cluster` blocks along x (1: none; grid.x a multiple of it, whole warps per block).
inline void run_grid(dim3 grid, dim3 block, size_t smem, int cluster,
                     std::function<void()> body) {
  Machine& m = machine();
  const int per_block = static_cast<int>(block.x * block.y * block.z);
  if (per_block <= 0 || per_block > 1024) fail("bad block size");
  if (cluster < 1 || cluster > 8 || grid.x % cluster != 0 ||
      (cluster > 1 && per_block % 32 != 0))
    fail("bad cluster size");
  const int n = per_block * cluster;  // the fibers of a cluster
  constexpr size_t kStack = 256 * 1024;
  constexpr size_t kGuard = 64 * 1024;
  constexpr unsigned char kGuardByte = 0x5A;
  m.per_block = per_block;
  m.fibers.resize(n);
  m.done.assign(n, 0);
  m.index.resize(n);
  m.slots.resize(n);
  while (static_cast<int>(m.stacks.size()) < n) m.stacks.emplace_back(kStack);
  m.body = std::move(body);
  gridDim = grid;
  blockDim = block;
  const char* seed = std::getenv("CAPSROUTE_EMULATION_SCHEDULE");
  const uint64_t seed_value = seed != nullptr ? std::strtoull(seed, nullptr, 10) : 0;
  m.shuffled = seed_value != 0;
  m.random.seed(seed_value + m.launches++);
  const bool shuffled = m.shuffled;
  auto& random = m.random;
  std::vector<uint3> firsts;  // each cluster's first block
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; bx += cluster) firsts.push_back(uint3{bx, by, bz});
  if (shuffled) std::shuffle(firsts.begin(), firsts.end(), random);
  std::vector<int> order(n);
  for (int t = 0; t < n; ++t) order[t] = t;
  for (const uint3& first : firsts) {
    m.blocks.assign(cluster, first);
    for (int r = 0; r < cluster; ++r) m.blocks[r].x += r;
    m.block.assign(cluster, Barrier{per_block, 0, 0});
    m.cluster = Barrier{n, 0, 0};
    // Not zero: kernels must not rely on it. A guard zone follows, checked after the block.
    m.dynamic_smem.resize(cluster);
    m.smem_bytes = smem;
    for (auto& mem : m.dynamic_smem) {
      mem.assign(smem + kGuard, 0xCD);
      std::memset(mem.data() + smem, kGuardByte, kGuard);
    }
    m.copies.assign(n, {});
    m.warps.assign(cluster * ((per_block + 31) / 32), Barrier{});
    m.named.assign(cluster, {});
    for (int f = 0; f < n; ++f) {
      const int t = f % per_block;
      ++m.warps[f / per_block * ((per_block + 31) / 32) + t / 32].alive;
      m.done[f] = 0;
      m.index[f] = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      getcontext(&m.fibers[f]);
      m.fibers[f].uc_stack.ss_sp = m.stacks[f].data();
      m.fibers[f].uc_stack.ss_size = kStack;
      m.fibers[f].uc_link = &m.scheduler;
      makecontext(&m.fibers[f], fiber_main, 0);
    }
    // A round runs each live thread until it waits or exits. Under a random schedule a round
    // runs the threads in a random order, and only those of the warps whose turn it is, so
    // that warps run ahead of each other between block barriers (in plain rounds all warps
    // advance one warp-wide step at a time, hiding races between warps); a round with no
    // progress is followed by a round of all warps. Drawn per block (cluster): a warp's turn
    // or pause changes with probability 1/2 or 1/16 a round, or (solo) one random warp runs
    // alone until it waits at a barrier that the others must reach. The longer stretches let
    // one warp run a whole phase (dozens of warp-wide steps) ahead of a warp held back, as
    // warps that meet only at a pair's barrier (row_pass_kernel's kDirect) can on a GPU.
    const int n_warps = static_cast<int>(m.warps.size());
    std::vector<char> runs(n_warps, 1);
    bool everyone = true;
    const uint64_t flip = std::array<uint64_t, 3>{2, 16, 0}[random() % 3];  // 0: solo
    int remaining = n;
    while (remaining > 0) {
      const uint64_t before = m.events;
      if (shuffled) std::shuffle(order.begin(), order.end(), random);
      for (const int f : order) {
        if (m.done[f] || !runs[f / 32]) continue;
        m.current = f;
        threadIdx = m.index[f];
        blockIdx = m.blocks[f / per_block];
        swapcontext(&m.scheduler, &m.fibers[f]);
        if (m.done[f]) --remaining;
      }
      const bool stuck = m.events == before;
      if (remaining > 0 && stuck && everyone) fail("deadlock: a barrier can never complete");
      if (!shuffled || stuck) {
        std::fill(runs.begin(), runs.end(), 1);
      } else if (flip == 0) {
        if (everyone) {
          std::fill(runs.begin(), runs.end(), 0);
          runs[random() % n_warps] = 1;
        }
      } else {
        for (char& r : runs)
          if (random() % flip == 0) r = !r;
      }
      everyone = std::all_of(runs.begin(), runs.end(), [](char r) { return r != 0; });
    }
    for (const auto& mem : m.dynamic_smem)
      for (size_t e = smem; e < smem + kGuard; ++e)
        if (mem[e] != kGuardByte) fail("shared memory written past the launch's size");
  }
}

// The running thread's block's dynamic shared memory.
inline unsigned char* shared_memory() { return machine().dynamic_smem[rank()].data(); }

// Thread-block clusters: barrier.cluster.arrive + wait (all threads of the cluster, which
// also orders their shared-memory accesses), the block's rank in its cluster, and the
// address in block `r`'s shared memory of what `p` addresses in the caller's
// (mapa.shared::cluster).
inline void cluster_sync() {
  land_pending_copies();
  wait(machine().cluster);
}
inline int cluster_rank() { return rank(); }
template <typename T>
T* cluster_shared(T* p, int r) {
  Machine& m = machine();
  const auto offset = reinterpret_cast<unsigned char*>(p) - shared_memory();
  if (r < 0 || r >= static_cast<int>(m.dynamic_smem.size()) || offset < 0 ||
      static_cast<size_t>(offset) >= m.smem_bytes)
    fail("cluster_shared: not a shared-memory address of the cluster");
  // A block's shared memory goes with its last thread (a GPU may give it to the next block).
  if (m.block[r].alive == 0) fail("cluster_shared: the block has exited");
  return reinterpret_cast<T*>(m.dynamic_smem[r].data() + offset);
}

// Every lane of the caller's warp publishes `x`; returns lane `src`'s value.
template <typename T>
T exchange(T x, int src) {
  static_assert(sizeof(T) <= 64 && std::is_trivially_copyable_v<T>);
  Machine& m = machine();
  Barrier& w = my_warp();
  if (w.alive != 32) fail("warp-wide operation with exited or missing lanes");
  std::memcpy(m.slots[m.current].data(), &x, sizeof(T));
  wait(w);
  T r;
  std::memcpy(&r, m.slots[(m.current & ~31) + (src & 31)].data(), sizeof(T));
  wait(w);  // nobody overwrites a slot before everyone has read it
  return r;
}

// cp.async: a copy lands only when a wait_group says so, so that reading the destination
// before the wait shows stale data (the shared memory starts as 0xCD bytes), or, never waited
// for, at the thread's next cluster barrier or exit (land_pending_copies). Under a random
// schedule half the copies land at once instead, as on a GPU they may: a copy issued into a
// buffer that other threads still read changes what they read.
template <int kBytes>
inline void cp_async(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % kBytes || reinterpret_cast<uintptr_t>(src) % kBytes)
    fail("cp.async from or to an address not aligned to its size");
  Machine& m = machine();
  if (m.shuffled && (m.random() & 1)) {
    std::memcpy(dst, src, kBytes);
    return;
  }
  m.copies[m.current].open.push_back({dst, src, kBytes});
}
inline void cp_async16(void* dst, const void* src) { cp_async<16>(dst, src); }

// What lane `lane` of the caller's warp published in the exchange in progress (call between
// the two barriers of a collective; see mma below).
template <typename T>
T peek(int lane) {
  T r;
  Machine& m = machine();
  std::memcpy(&r, m.slots[(m.current & ~31) + lane].data(), sizeof(T));
  return r;
}

inline float tf32_value(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// x rounded to float toward zero (non-finite values as they are).
inline float round_toward_zero(double x) {
  float f = static_cast<float>(x);
  if (std::isfinite(f) && std::fabs(double(f)) > std::fabs(x)) f = std::nextafter(f, 0.f);
  return f;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, d += A B, with the PTX fragment layout
// (g = lane / 4, t = lane % 4): a = {A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]},
// b = {B[t][g], B[t+4][g]}, d = {D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]}. Operands
// are read as TF32 (the low 13 bits ignored, as the hardware does); products are summed
// in double and rounded once, toward zero: the matrix units truncate their float32 sums
// (Fasi et al. 2021 measured it on V100, T4 and A100; on the H100 a running sum kept in the
// accumulators lost 1e-5 of v). The hardware's narrower alignment of the addends is not
// modelled.
inline void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Frag {
    uint32_t a[4], b[2];
  };
  Frag mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  Machine& m = machine();
  Barrier& w = my_warp();
  if (w.alive != 32) fail("mma with exited lanes");
  std::memcpy(m.slots[m.current].data(), &mine, sizeof mine);
  wait(w);
  const int lane = m.current & 31, g = lane >> 2, t = lane & 3;
  auto A = [&](int row, int k) {
    const Frag f = peek<Frag>((row % 8) * 4 + k % 4);
    return tf32_value(f.a[(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)] & ~0x1fffu);
  };
  auto B = [&](int k, int col) {
    const Frag f = peek<Frag>(col * 4 + k % 4);
    return tf32_value(f.b[k >= 4 ? 1 : 0] & ~0x1fffu);
  };
  float out[4];
  for (int q = 0; q < 4; ++q) {
    const int row = g + 8 * (q >> 1), col = 2 * t + (q & 1);
    double acc = d[q];
    for (int k = 0; k < 8; ++k) acc += double(A(row, k)) * double(B(k, col));
    out[q] = round_toward_zero(acc);
  }
  wait(w);
  std::memcpy(d, out, sizeof out);
}

// ex2.approx.ftz.f32: 2^x, results below the smallest normal flushed to zero. The hardware's
// own error (about 2 ulp) is not modelled: exact 2^x rounded to float.
inline float ex2_approx_ftz(float x) {
  const float y = std::exp2(x);
  return std::fabs(y) < std::numeric_limits<float>::min() ? 0.f : y;
}

}  // namespace emu
}  // namespace capsroute

// --- device intrinsics -------------------------------------------------------------------

inline void __syncthreads() {
  capsroute::emu::wait(capsroute::emu::machine().block[capsroute::emu::rank()]);
}
inline void __syncwarp(unsigned = 0xffffffffu) { capsroute::emu::wait(capsroute::emu::my_warp()); }

template <typename T>
inline T __shfl_sync(unsigned mask, T x, int src, int = 32) {
  if (mask != 0xffffffffu) capsroute::emu::fail("only full-warp shuffles are emulated");
  return capsroute::emu::exchange(x, src);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T x, int lane_mask, int = 32) {
  if (mask != 0xffffffffu) capsroute::emu::fail("only full-warp shuffles are emulated");
  return capsroute::emu::exchange(x, (threadIdx.x & 31) ^ lane_mask);
}

// --- host runtime --------------------------------------------------------------------------

#define C10_CUDA_CHECK(expr) (void)(expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() (void)0

namespace capsroute {
namespace cuda {

inline cudaStream_t current_stream() { return nullptr; }

// The emulated GPU: an H100's compute capability and shared memory (less with
// CAPSROUTE_MAX_SMEM_KB, as on a GPU: block_smem), or with CAPSROUTE_EMULATION_CC="major.minor"
// (read at every call) another compute capability. Few "multiprocessors", so that small test
// shapes still split the input capsules over several blocks and exercise the cross-block sums.
inline DeviceInfo device_info() {
  DeviceInfo gpu{9, 0, "the emulated GPU", 227 * 1024, 2};
  if (const char* cc = std::getenv("CAPSROUTE_EMULATION_CC"))
    if (std::sscanf(cc, "%d.%d", &gpu.major, &gpu.minor) != 2)
      emu::fail("CAPSROUTE_EMULATION_CC must be major.minor");
  return gpu;
}

// kernel<<<grid, block, smem>>>(args...) in clusters of `cluster` blocks along x; refused
// where smem is more than a block may have (check_smem), as on a GPU.
template <typename... Params, typename... Args>
void launch_clusters(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                     cudaStream_t, int cluster, Args&&... args) {
  check_smem(smem, device_info());
  std::tuple<Params...> params(std::forward<Args>(args)...);  // converted once, as a launch does
  emu::run_grid(grid, block, smem, cluster, [&] { std::apply(kernel, params); });
}
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            Args&&... args) {
  launch_clusters(kernel, grid, block, smem, stream, 1, std::forward<Args>(args)...);
}

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

// Memory the kernels must write before they read it: NaN until then (see runtime.h).
inline at::Tensor scratch(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
}

}  // namespace cuda
}  // namespace capsroute
