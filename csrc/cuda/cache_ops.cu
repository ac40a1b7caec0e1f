// Torch-free launchers of the cache ops: write_kv and copy_blocks (kernels/cache_kernels.cuh),
// and swap_blocks, which is memcpys only. write_kv is instantiated for {float, half, bf16}
// inputs x {same-type, fp8} caches; copy_blocks copies bytes and has one instantiation.
#include "cuda/alignment.h"
#include "cuda/dispatch.h"
#include "cuda/launchers.h"
#include "kernels/cache_kernels.cuh"
#include "kernels/kcompat.cuh"

#include <algorithm>

namespace paged_attn::launch {

using kernels::CopyBlocksKernelParams;

std::string write_kv_unsupported(const WriteKVParams& params) {
  const int64_t input_bytes = element_bytes(params.input_dtype);
  const int64_t row_bytes = params.key_layout.head_size * input_bytes;
  std::string error = cache_alignment_error("key_cache", params.key_cache, params.key_layout);
  if (error.empty()) {
    error = cache_alignment_error("value_cache", params.value_cache, params.value_layout);
  }
  if (error.empty()) {
    error = vector_alignment_error("key", params.key,
                                   {{"token stride", params.key_token_stride * input_bytes},
                                    {"head stride", params.key_head_stride * input_bytes},
                                    {"row length (head_size * element size)", row_bytes}});
  }
  if (error.empty()) {
    error = vector_alignment_error("value", params.value,
                                   {{"token stride", params.value_token_stride * input_bytes},
                                    {"head stride", params.value_head_stride * input_bytes}});
  }
  return error;
}

void launch_write_kv(const WriteKVParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0) return;
  using WriteKernel = void (*)(WriteKVParams);
  const WriteKernel kernel = with_value_and_cache_types<CudaElementTypes>(
      params.input_dtype, params.key_layout.dtype, [](auto input_tag, auto cache_tag) -> WriteKernel {
        return &kernels::write_kv_kernel<typename decltype(input_tag)::type,
                                         typename decltype(cache_tag)::type>;
      });
  KLAUNCH(kernel, dim3(static_cast<unsigned>(params.num_tokens)), kernels::kCacheThreads, 0,
          stream, params);
}

std::string copy_blocks_unsupported(const CopyBlocksParams& params) {
  // Every layer shares layer 0's layout (core/checks.cpp), so only the base pointers differ.
  for (size_t layer = 0; layer < params.key_caches.size(); ++layer) {
    const std::string key_name = "key_caches[" + std::to_string(layer) + "]";
    const std::string value_name = "value_caches[" + std::to_string(layer) + "]";
    std::string error = cache_alignment_error(key_name.c_str(), params.key_caches[layer],
                                              params.key_layout);
    if (error.empty()) {
      error = cache_alignment_error(value_name.c_str(), params.value_caches[layer],
                                    params.value_layout);
    }
    if (!error.empty()) return error;
  }
  return {};
}

void launch_copy_blocks(const CopyBlocksParams& params, cudaStream_t stream) {
  if (params.num_pairs == 0) return;
  const int num_layers = static_cast<int>(params.key_caches.size());
  // Usually one launch for all layers; models deeper than kMaxLayers take one per kMaxLayers.
  for (int first = 0; first < num_layers; first += CopyBlocksKernelParams::kMaxLayers) {
    const int layers = std::min(CopyBlocksKernelParams::kMaxLayers, num_layers - first);
    CopyBlocksKernelParams kernel_params{};
    for (int layer = 0; layer < layers; ++layer) {
      kernel_params.key_caches[layer] = static_cast<unsigned char*>(params.key_caches[first + layer]);
      kernel_params.value_caches[layer] =
          static_cast<unsigned char*>(params.value_caches[first + layer]);
    }
    kernel_params.key_layout = params.key_layout;
    kernel_params.value_layout = params.value_layout;
    kernel_params.block_mapping = params.block_mapping;
    kernel_params.element_bytes = element_bytes(params.key_layout.dtype);
    KLAUNCH(kernels::copy_blocks_kernel, dim3(static_cast<unsigned>(params.num_pairs), layers),
            kernels::kCacheThreads, 0, stream, kernel_params);
  }
}

namespace {

// The rows (token, head) of a block in the order one cache stores them: tokens outer for NHD,
// heads outer for an HND view. `packed` when those rows fill the block without gaps, in which
// case the whole block is one contiguous run.
struct RowOrder {
  bool heads_outer;
  int64_t outer_count;
  int64_t inner_count;
  bool packed;
};

RowOrder row_order(const CacheLayout& layout) {
  RowOrder order;
  order.heads_outer = layout.head_stride > layout.token_stride;
  order.outer_count = order.heads_outer ? layout.num_kv_heads : layout.block_size;
  order.inner_count = order.heads_outer ? layout.block_size : layout.num_kv_heads;
  const int64_t inner_stride = order.heads_outer ? layout.token_stride : layout.head_stride;
  const int64_t outer_stride = order.heads_outer ? layout.head_stride : layout.token_stride;
  order.packed = inner_stride == layout.head_size && outer_stride == order.inner_count * layout.head_size;
  return order;
}

}  // namespace

void launch_swap_blocks(const SwapBlocksParams& params, cudaStream_t stream) {
  const CacheLayout& src = params.src_layout;
  const CacheLayout& dst = params.dst_layout;
  const auto* src_bytes = static_cast<const unsigned char*>(params.src);
  auto* dst_bytes = static_cast<unsigned char*>(params.dst);
  const int64_t element = params.element_bytes;
  const RowOrder order = row_order(src);
  const RowOrder dst_order = row_order(dst);
  // When both caches pack their blocks in the same row order, a block is one piece; otherwise
  // each (token, head) row of head_size elements is.
  const bool whole_blocks = order.packed && dst_order.packed && order.heads_outer == dst_order.heads_outer;
  const int64_t piece_bytes =
      whole_blocks ? src.block_size * src.num_kv_heads * src.head_size * element : src.head_size * element;
  const int64_t pieces_per_block = whole_blocks ? 1 : order.outer_count * order.inner_count;

  // Pieces are visited in (pair, row order) order; each one extends the pending copy when it
  // continues it on both sides, so consecutive blocks mapped to consecutive blocks become one
  // memcpy.
  int64_t run_src = 0;
  int64_t run_dst = 0;
  int64_t run_bytes = 0;
  for (int64_t pair = 0; pair < params.num_pairs; ++pair) {
    const int64_t src_block = params.block_mapping[2 * pair];
    const int64_t dst_block = params.block_mapping[2 * pair + 1];
    for (int64_t piece = 0; piece < pieces_per_block; ++piece) {
      const int64_t outer = piece / order.inner_count;
      const int64_t inner = piece % order.inner_count;
      const int64_t token = order.heads_outer ? inner : outer;
      const int64_t head = order.heads_outer ? outer : inner;
      const int64_t src_offset =
          (src_block * src.block_stride + token * src.token_stride + head * src.head_stride) * element;
      const int64_t dst_offset =
          (dst_block * dst.block_stride + token * dst.token_stride + head * dst.head_stride) * element;
      if (run_bytes > 0 && src_offset == run_src + run_bytes && dst_offset == run_dst + run_bytes) {
        run_bytes += piece_bytes;
        continue;
      }
      if (run_bytes > 0) kmemcpy_async(dst_bytes + run_dst, src_bytes + run_src, run_bytes, stream);
      run_src = src_offset;
      run_dst = dst_offset;
      run_bytes = piece_bytes;
    }
  }
  if (run_bytes > 0) kmemcpy_async(dst_bytes + run_dst, src_bytes + run_src, run_bytes, stream);
}

}  // namespace paged_attn::launch
