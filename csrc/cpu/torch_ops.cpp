// The CPU backend of the paged_attn ops: validates the ATen arguments into torch-free params
// (core/checks.h) and runs the kernels of kernels.h. Schemas live in torch_bindings.cpp.
#include <torch/library.h>

#include "core/checks.h"
#include "cpu/kernels.h"
#include "ops.h"

namespace paged_attn::cpu {

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, double scale, int64_t max_seq_len,
                     const std::optional<at::Tensor>& alibi_slopes, int64_t sliding_window,
                     double logits_soft_cap, const std::optional<at::Tensor>& k_scale,
                     const std::optional<at::Tensor>& v_scale) {
  run_paged_attention(make_paged_attention_params(
      out, query, key_cache, value_cache, block_tables, seq_lens, scale, max_seq_len,
      alibi_slopes, sliding_window, logits_soft_cap, k_scale, v_scale));
}

void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
              at::Tensor& value_cache, const at::Tensor& slot_mapping,
              const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  run_write_kv(
      make_write_kv_params(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale));
}

void copy_blocks(at::TensorList key_caches, at::TensorList value_caches,
                 const at::Tensor& block_mapping) {
  run_copy_blocks(make_copy_blocks_params(key_caches, value_caches, block_mapping));
}

void swap_blocks(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping) {
  TORCH_CHECK(src.is_cpu() && dst.is_cpu(),
              "swap_blocks: the CPU kernel copies between CPU tensors, got src on ", src.device(),
              " and dst on ", dst.device(), "; swaps to or from a GPU need the CUDA build");
  run_swap_blocks(make_swap_blocks_params(src, dst, block_mapping));
}

}  // namespace paged_attn::cpu

TORCH_LIBRARY_IMPL(paged_attn, CPU, m) {
  m.impl("paged_attention", &paged_attn::cpu::paged_attention);
  m.impl("write_kv", &paged_attn::cpu::write_kv);
  m.impl("copy_blocks", &paged_attn::cpu::copy_blocks);
  m.impl("swap_blocks", &paged_attn::cpu::swap_blocks);
}
