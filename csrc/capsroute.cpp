// The capsroute library: defines the operators (schemas in csrc/schemas.h, documented here).
// The CPU and CUDA implementations register in their own TORCH_LIBRARY_IMPL blocks
// (csrc/cpu/, csrc/cuda/); fake kernels and autograd are registered from Python
// (capsroute/_ops.py).
//
// Forward ops return (v, c, s):
//   v [B, N_out, D_out]                    the output capsules of the last iteration
//   c [B, N_in, N_out] or [0]              coupling coefficients of the last iteration,
//                                          only when return_coupling (else an empty tensor)
//   s [iterations, B, N_out, D_out]        pre-squash sums of every iteration, in the
//                                          accumulation dtype (float32 for half types):
//                                          all the backward needs besides the inputs.
// Backward ops take the gradients of v (and of c, when it was returned) and give the
// gradients of the inputs; grad_bias is an empty tensor when has_bias is false. grad_v is
// read in the inputs' dtype (as autograd hands it over: v's dtype; another is converted to
// it), grad_c and s in the accumulation dtype.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

// A tiny Python module so that `import capsroute._C` loads this library and runs the
// registrations below; the ops themselves are reached through torch.ops.capsroute.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", /*doc=*/nullptr, /*size=*/-1, /*methods=*/nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(capsroute, m) { capsroute::define_ops(m); }
