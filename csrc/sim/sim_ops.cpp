// The emulator's test ops, torch.ops.paged_attn_sim.*: the CUDA kernels run on CPU tensors.
//
// TORCH_LIBRARY(paged_attn_sim) defines exactly the schemas of paged_attn::kOpSchemas, and the
// CPU implementations below run the same glue as the CUDA ops (cuda/op_glue.h) with a null
// stream; the launchers and kernels they reach are the csrc/cuda/*.cu sources compiled by g++
// against the SIMT emulator (compile_*.cpp). PyInit__sim adds set_decode_config(), the decode
// launch knobs that let tests force the one-pass or split-K path on short contexts.
#include <Python.h>
#include <torch/library.h>

#include "core/schemas.h"
#include "cuda/op_glue.h"
#include "ops.h"

namespace paged_attn::sim {

namespace {

// Set from Python by set_decode_config(); tests run ops from one thread.
launch::DecodeLaunchConfig decode_config;

glue::LaunchContext emulator_context() {
  glue::LaunchContext context;
  context.decode = decode_config;
  return context;
}

}  // namespace

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, double scale, int64_t max_seq_len,
                     const std::optional<at::Tensor>& alibi_slopes, int64_t sliding_window,
                     double logits_soft_cap, const std::optional<at::Tensor>& k_scale,
                     const std::optional<at::Tensor>& v_scale) {
  glue::paged_attention(emulator_context(), out, query, key_cache, value_cache, block_tables,
                        seq_lens, scale, max_seq_len, alibi_slopes, sliding_window,
                        logits_soft_cap, k_scale, v_scale);
}

void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
              at::Tensor& value_cache, const at::Tensor& slot_mapping,
              const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  glue::write_kv(emulator_context(), key, value, key_cache, value_cache, slot_mapping, k_scale,
                 v_scale);
}

void copy_blocks(at::TensorList key_caches, at::TensorList value_caches,
                 const at::Tensor& block_mapping) {
  glue::copy_blocks(emulator_context(), key_caches, value_caches, block_mapping);
}

void swap_blocks(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping) {
  glue::swap_blocks(emulator_context(), src, dst, block_mapping);
}

}  // namespace paged_attn::sim

TORCH_LIBRARY(paged_attn_sim, m) {
  for (const char* schema : paged_attn::kOpSchemas) m.def(schema);
}

TORCH_LIBRARY_IMPL(paged_attn_sim, CPU, m) {
  m.impl("paged_attention", &paged_attn::sim::paged_attention);
  m.impl("write_kv", &paged_attn::sim::write_kv);
  m.impl("copy_blocks", &paged_attn::sim::copy_blocks);
  m.impl("swap_blocks", &paged_attn::sim::swap_blocks);
}

namespace {

// set_decode_config(path, partition_size, num_sms): path 0 = auto, 1 = one pass, 2 = split-K
// (launch::DecodePath); num_sms 0 = the emulator's default (108, or $SIMT_NUM_SMS).
PyObject* set_decode_config(PyObject* /*module*/, PyObject* args) {
  int path = 0;
  int partition_size = 0;
  int num_sms = 0;
  if (!PyArg_ParseTuple(args, "iii", &path, &partition_size, &num_sms)) return nullptr;
  if (path < 0 || path > 2 || partition_size <= 0 || num_sms < 0) {
    PyErr_Format(PyExc_ValueError,
                 "set_decode_config: need path in {0, 1, 2}, partition_size > 0, num_sms >= 0; "
                 "got %d, %d, %d", path, partition_size, num_sms);
    return nullptr;
  }
  paged_attn::sim::decode_config = {static_cast<paged_attn::launch::DecodePath>(path),
                                    partition_size, num_sms};
  Py_RETURN_NONE;
}

PyMethodDef module_methods[] = {
    {"set_decode_config", set_decode_config, METH_VARARGS,
     "set_decode_config(path, partition_size, num_sms): decode launch knobs of the emulator ops"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__sim(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sim", nullptr, -1, module_methods};
  return PyModule_Create(&module);
}
