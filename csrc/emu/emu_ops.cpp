// The CUDA implementation of the capsroute ops (csrc/cuda/), compiled for the CPU emulation
// of csrc/emu/cuda_emu.h: the same kernels and launch sequences, run on CPU tensors as the
// ops torch.ops.capsroute_emu.*. The tests build this with -DCAPSROUTE_EMULATE
// (tests/test_cuda_emulation.py) to check the CUDA code against the reference where no GPU
// is at hand. Not part of the installed package.
#ifndef CAPSROUTE_EMULATE
#error "build with -DCAPSROUTE_EMULATE"
#endif

#include "../cuda/routing_launch.cuh"

namespace capsroute {
namespace cuda_launch {
CAPSROUTE_INSTANTIATE_CUDA(float)
CAPSROUTE_INSTANTIATE_CUDA(double)
CAPSROUTE_INSTANTIATE_CUDA(at::Half)
CAPSROUTE_INSTANTIATE_CUDA(at::BFloat16)
}  // namespace cuda_launch
}  // namespace capsroute

#include "../cuda/routing_cuda.cu"
