// The CUDA implementations of the paged_attn ops: TORCH_LIBRARY_IMPL(paged_attn, CUDA). Each
// op pins the device of its tensors, takes the current CUDA stream and runs the glue shared with
// the emulator (cuda/op_glue.h). Compiled by the host compiler: ATen stays out of the .cu files.
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/op_glue.h"
#include "ops.h"

namespace paged_attn::cuda {

namespace {

// Everything runs on the current stream of the device the tensors live on.
glue::LaunchContext current_stream_context(const at::Device& device) {
  glue::LaunchContext context;
  context.stream = c10::cuda::getCurrentCUDAStream(device.is_cuda() ? device.index() : -1).stream();
  return context;
}

}  // namespace

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, double scale, int64_t max_seq_len,
                     const std::optional<at::Tensor>& alibi_slopes, int64_t sliding_window,
                     double logits_soft_cap, const std::optional<at::Tensor>& k_scale,
                     const std::optional<at::Tensor>& v_scale) {
  const c10::OptionalDeviceGuard device_guard(query.device());
  glue::paged_attention(current_stream_context(query.device()), out, query, key_cache,
                        value_cache, block_tables, seq_lens, scale, max_seq_len, alibi_slopes,
                        sliding_window, logits_soft_cap, k_scale, v_scale);
}

void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
              at::Tensor& value_cache, const at::Tensor& slot_mapping,
              const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  const c10::OptionalDeviceGuard device_guard(key.device());
  glue::write_kv(current_stream_context(key.device()), key, value, key_cache, value_cache,
                 slot_mapping, k_scale, v_scale);
}

void copy_blocks(at::TensorList key_caches, at::TensorList value_caches,
                 const at::Tensor& block_mapping) {
  const at::Device device = block_mapping.device();
  const c10::OptionalDeviceGuard device_guard(device);
  glue::copy_blocks(current_stream_context(device), key_caches, value_caches, block_mapping);
}

void swap_blocks(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping) {
  // One side may be host memory; the copies go on the stream of the CUDA side.
  const at::Device device = src.is_cuda() ? src.device() : dst.device();
  const c10::OptionalDeviceGuard device_guard(device);
  glue::swap_blocks(current_stream_context(device), src, dst, block_mapping);
}

}  // namespace paged_attn::cuda

TORCH_LIBRARY_IMPL(paged_attn, CUDA, m) {
  m.impl("paged_attention", &paged_attn::cuda::paged_attention);
  m.impl("write_kv", &paged_attn::cuda::write_kv);
  m.impl("copy_blocks", &paged_attn::cuda::copy_blocks);
  m.impl("swap_blocks", &paged_attn::cuda::swap_blocks);
}
