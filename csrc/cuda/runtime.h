// The few CUDA runtime services the launch code uses (current stream, device properties,
// kernel launch with its error check, device guard, scratch memory), in one place so that
// the same launch code builds for a GPU or, with -DCAPSROUTE_EMULATE, for the CPU emulation
// that tests the kernels on machines without one (csrc/emu/cuda_emu.h).
#pragma once

#ifdef CAPSROUTE_EMULATE
#include "../emu/cuda_emu.h"
#else
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "device.h"

#include <array>
#include <map>
#include <mutex>
#include <utility>

namespace capsroute {
namespace cuda {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// What the launch code needs to know of the current device, read once per device.
inline const DeviceInfo& device_info() {
  constexpr int kDevices = 64;
  static std::array<std::once_flag, kDevices> once;
  static std::array<DeviceInfo, kDevices> known;
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < kDevices, "capsroute: CUDA device ", device,
              " is past the ", kDevices, " it keeps the properties of");
  std::call_once(once[device], [device] {
    cudaDeviceProp p{};
    C10_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
    known[device] = {p.major, p.minor, p.name, p.sharedMemPerBlockOptin, p.multiProcessorCount};
  });
  return known[device];
}

// Throws on a failed runtime call. A kernel that has no code for this GPU (the build's
// TORCH_CUDA_ARCH_LIST left its architecture out) says how to rebuild, where the runtime
// would say only "no kernel image is available".
inline void check(cudaError_t error) {
  if (error == cudaErrorNoKernelImageForDevice || error == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // not a sticky error: clear it for the caller's next call
    const DeviceInfo& gpu = device_info();
    TORCH_CHECK(false, "capsroute: this build has no CUDA kernels for ", gpu.name,
                " (compute capability ", gpu.major, ".", gpu.minor,
                "); reinstall capsroute with TORCH_CUDA_ARCH_LIST=\"", gpu.major, ".", gpu.minor,
                "\" (README.md, Install)");
  }
  C10_CUDA_CHECK(error);
}

// Lets `kernel` use `smem` bytes of dynamic shared memory on the current device (above the
// default 48 KB it must opt in), after checking that a block may have them (check_smem, at
// every launch). The opt-in is a runtime call of a few microseconds of host time, and a
// forward+backward launches ~9 such kernels: it is made once per kernel and device, and again
// only for a larger size.
inline void allow_dynamic_smem(const void* kernel, size_t smem) {
  check_smem(smem, device_info());
  if (smem <= 48 * 1024) return;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> allowed;  // (kernel, device) -> bytes
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  size_t& bytes = allowed[{kernel, device}];
  if (smem <= bytes) return;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)));
  bytes = smem;
}

// kernel<<<grid, block, smem, stream>>>(args...), then the launch check.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            Args&&... args) {
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  check(cudaGetLastError());
}

// The same in thread-block clusters of `cluster` blocks along x (grid.x a multiple of it;
// 1: a plain launch). Clusters need a GPU of compute capability 9.0 (has_clusters).
template <typename... Params, typename... Args>
void launch_clusters(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                     cudaStream_t stream, int cluster, Args&&... args) {
  if (cluster <= 1) return launch(kernel, grid, block, smem, stream, std::forward<Args>(args)...);
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  check(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
  check(cudaGetLastError());
}

using DeviceGuard = c10::cuda::CUDAGuard;

// Memory that the kernels write in full before they read it (no fill: at::empty). The
// emulation fills it with NaN, so that a read of an entry never written shows in the results.
inline at::Tensor scratch(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

}  // namespace cuda
}  // namespace capsroute
#endif
