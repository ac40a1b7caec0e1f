// The only TORCH_LIBRARY(paged_attn) block: defines every op schema (listed and documented in
// core/schemas.h). Backends register their kernels beside their code with TORCH_LIBRARY_IMPL.
// PyInit__C is empty but for one flag: importing paged_attn._C only has to load this library so
// that the static registrations run. `built_with_cuda` tells tests whether CUDA kernels exist.
#include <Python.h>
#include <torch/library.h>

#include "core/schemas.h"

TORCH_LIBRARY(paged_attn, m) {
  for (const char* schema : paged_attn::kOpSchemas) m.def(schema);
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* python_module = PyModule_Create(&module);
#ifdef PAGED_ATTN_WITH_CUDA
  PyModule_AddIntConstant(python_module, "built_with_cuda", 1);
#else
  PyModule_AddIntConstant(python_module, "built_with_cuda", 0);
#endif
  return python_module;
}
