// ATen glue shared by the CUDA ops (cuda/cuda_ops.cpp) and the emulator's test ops
// (sim/sim_ops.cpp): validate with core/checks into the params structs, add the checks only the
// CUDA kernels need, allocate scratch from the tensors' allocator and call the torch-free
// launchers of cuda/launchers.h. The two bindings differ only in the LaunchContext they pass,
// so the emulator runs exactly the tensor -> params -> launch path a GPU runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "core/checks.h"
#include "cuda/launchers.h"

namespace paged_attn::glue {

struct LaunchContext {
  cudaStream_t stream = nullptr;        // the current CUDA stream; null on the emulator
  launch::DecodeLaunchConfig decode{};  // defaults on a GPU; test knobs on the emulator
};

inline void paged_attention(const LaunchContext& context, at::Tensor& out,
                            const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale, int64_t max_seq_len,
                            const std::optional<at::Tensor>& alibi_slopes, int64_t sliding_window,
                            double logits_soft_cap, const std::optional<at::Tensor>& k_scale,
                            const std::optional<at::Tensor>& v_scale) {
  const PagedAttentionParams params = make_paged_attention_params(
      out, query, key_cache, value_cache, block_tables, seq_lens, scale, max_seq_len,
      alibi_slopes, sliding_window, logits_soft_cap, k_scale, v_scale);
  const std::string unsupported = launch::paged_attention_unsupported(params);
  TORCH_CHECK(unsupported.empty(), "paged_attention: ", unsupported);
  const launch::DecodePlan plan = launch::plan_paged_attention(params, context.decode);
  // Split-K scratch comes from the tensors' allocator: on CUDA the caching allocator, on the
  // current stream and capturable by a CUDA graph; no cudaMalloc and no host sync per call.
  const at::Tensor scratch =
      plan.split_k ? at::empty({plan.scratch_floats()}, query.options().dtype(at::kFloat))
                   : at::Tensor();
  launch::launch_paged_attention(params, plan,
                                 plan.split_k ? scratch.data_ptr<float>() : nullptr,
                                 context.stream);
}

inline void write_kv(const LaunchContext& context, const at::Tensor& key, const at::Tensor& value,
                     at::Tensor& key_cache, at::Tensor& value_cache,
                     const at::Tensor& slot_mapping, const std::optional<at::Tensor>& k_scale,
                     const std::optional<at::Tensor>& v_scale) {
  const WriteKVParams params =
      make_write_kv_params(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale);
  const std::string unsupported = launch::write_kv_unsupported(params);
  TORCH_CHECK(unsupported.empty(), "write_kv: ", unsupported);
  launch::launch_write_kv(params, context.stream);
}

inline void copy_blocks(const LaunchContext& context, at::TensorList key_caches,
                        at::TensorList value_caches, const at::Tensor& block_mapping) {
  const CopyBlocksParams params = make_copy_blocks_params(key_caches, value_caches, block_mapping);
  const std::string unsupported = launch::copy_blocks_unsupported(params);
  TORCH_CHECK(unsupported.empty(), "copy_blocks: ", unsupported);
  launch::launch_copy_blocks(params, context.stream);
}

inline void swap_blocks(const LaunchContext& context, const at::Tensor& src, at::Tensor& dst,
                        const at::Tensor& block_mapping) {
  launch::launch_swap_blocks(make_swap_blocks_params(src, dst, block_mapping), context.stream);
}

}  // namespace paged_attn::glue
