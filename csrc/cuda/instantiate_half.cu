// The half instantiation of the CUDA launch sequences (one file per dtype so that they
// compile in parallel).
#include "routing_launch.cuh"

namespace capsroute {
namespace cuda_launch {
CAPSROUTE_INSTANTIATE_CUDA(at::Half)
}  // namespace cuda_launch
}  // namespace capsroute
