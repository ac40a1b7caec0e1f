// One host signature per op. Each backend (cpu/, cuda/, the emulator in sim/) defines these
// functions in its own namespace and registers them with TORCH_LIBRARY_IMPL beside its code.
// Argument shapes and semantics are documented once, in core/schemas.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#define PAGED_ATTN_DECLARE_OPS                                                                 \
  void paged_attention(                                                                        \
      at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,                   \
      const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens, \
      double scale, int64_t max_seq_len, const std::optional<at::Tensor>& alibi_slopes,        \
      int64_t sliding_window, double logits_soft_cap, const std::optional<at::Tensor>& k_scale, \
      const std::optional<at::Tensor>& v_scale);                                               \
  void write_kv(                                                                               \
      const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,                   \
      at::Tensor& value_cache, const at::Tensor& slot_mapping,                                 \
      const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale);     \
  void copy_blocks(                                                                            \
      at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping); \
  void swap_blocks(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping);

namespace paged_attn::cpu {
PAGED_ATTN_DECLARE_OPS
}
namespace paged_attn::cuda {
PAGED_ATTN_DECLARE_OPS
}
namespace paged_attn::sim {
PAGED_ATTN_DECLARE_OPS
}

#undef PAGED_ATTN_DECLARE_OPS
