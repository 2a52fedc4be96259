// The current GPU as the launch code sees it, for both runtimes (runtime.h on a GPU,
// csrc/emu/cuda_emu.h in the emulation, each with its device_info()), the checks made
// against it (the switches' parser, env_number, is ../switches.h).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "../switches.h"

namespace capsroute {
namespace cuda {

struct DeviceInfo {
  int major, minor;  // compute capability
  std::string name;
  // The most dynamic shared memory one block may use once the kernel opts in: 227 KB on an
  // H100, 163 KB on an A100, 99 KB at compute capability 8.6, 8.9 and 12.0 (RTX 30xx, 40xx
  // and 50xx, A10, L4, L40). The launch code plans each kernel's within it.
  size_t max_block_smem;
  int multiprocessors;
};

// Thread-block clusters (launch_clusters): compute capability 9.0 and newer.
inline bool has_clusters(const DeviceInfo& gpu) { return gpu.major >= 9; }

// The kernels use the matrix units' TF32 products and cp.async: compute capability 8.0 and
// newer. Older GPUs get this error before anything runs (the kernels' code for them, where a
// build includes their architecture, only traps).
inline void check_device(const char* op, const DeviceInfo& gpu) {
  TORCH_CHECK(gpu.major >= 8, op,
              ": the CUDA kernels need a GPU of compute capability 8.0 or newer (A100, RTX 30xx "
              "and later), but ", gpu.name, " is ", gpu.major, ".", gpu.minor,
              "; run it on CPU tensors, or use capsroute.reference (the same math in plain "
              "PyTorch ops)");
}

// The shared memory a block may use (bytes): the device's, or less with
// CAPSROUTE_MAX_SMEM_KB=n (read at every call, as the launch code's other switches): the
// kernels then plan and launch as on a GPU that allows a block n KB, e.g. 163 (an A100) or
// 99 (compute capability 8.6, 8.9, 12.0), so that one GPU, or the emulation, runs the plans
// of GPUs that allow less.
inline size_t block_smem(const DeviceInfo& gpu) {
  const char* name = "CAPSROUTE_MAX_SMEM_KB";
  const int64_t kb = env_number(name, "a number of KB, 1 or more");
  TORCH_CHECK_VALUE(kb != 0, "capsroute: ", name, " must be a number of KB, 1 or more");
  return kb < 0 ? gpu.max_block_smem : std::min(gpu.max_block_smem, static_cast<size_t>(kb) * 1024);
}

// A launch's shared memory fits the block (block_smem): the launch code plans it so, so a
// failure here is capsroute's bug, said as such rather than as the runtime's "invalid
// argument".
inline void check_smem(size_t smem, const DeviceInfo& gpu) {
  const size_t limit = block_smem(gpu);
  TORCH_CHECK(smem <= limit, "capsroute: internal error: a kernel asks for ", smem,
              " bytes of shared memory, but a block may have ", limit, " on ", gpu.name,
              "; please report it with the shapes of the call");
}

}  // namespace cuda
}  // namespace capsroute
