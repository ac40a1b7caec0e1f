// Device code of the cache-management ops: write_kv (store new tokens' K/V into their slots,
// quantizing for fp8 caches) and copy_blocks (copy whole blocks in every layer's caches).
// swap_blocks needs no kernel: its launcher issues one memcpy per contiguous run.
#pragma once

#include "core/params.h"
#include "kernels/element_types.cuh"
#include "kernels/kcompat.cuh"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace paged_attn::kernels {

inline constexpr int kCacheThreads = 128;

// The elements one thread moves at a time in write_kv: one 16-byte vector on the wider side.
// Same dtype: one vector in, one out. fp8 cache: e.g. 16 elements = four float32 input vectors
// quantized into one 16-byte fp8 vector.
template <typename input_t, typename cache_t>
inline constexpr int kWriteUnitElems = std::max(kElemsPerVec<input_t>, kElemsPerVec<cache_t>);

// Moves one unit of kWriteUnitElems elements of a token row into its cache slot.
template <typename input_t, typename cache_t>
__device__ __forceinline__ void write_unit(const input_t* source,  // [kWriteUnitElems] of a K/V row
                                          cache_t* destination,   // [kWriteUnitElems] of a slot row
                                          float scale) {
  if constexpr (std::is_same_v<input_t, cache_t>) {
    store_vec(destination, load_vec(source));
  } else {
    constexpr int kUnit = kWriteUnitElems<input_t, cache_t>;
    constexpr int kInputVecs = kUnit / kElemsPerVec<input_t>;
    float values[kUnit];
#pragma unroll
    for (int v = 0; v < kInputVecs; ++v) {
      unpack_to_float<input_t>(load_vec(source + v * kElemsPerVec<input_t>),
                               &values[v * kElemsPerVec<input_t>]);
    }
    // kUnit is a whole number of cache vectors; assemble them in registers, then store.
    constexpr int kCacheVecs = kUnit / kElemsPerVec<cache_t>;
    Vec16 packed[kCacheVecs];
    cache_t* packed_elems = reinterpret_cast<cache_t*>(packed);
#pragma unroll
    for (int e = 0; e < kUnit; ++e) {
      // True float32 division, as torch's (x.float() / scale) before .to(float8_e4m3fn).
      packed_elems[e] = from_float<cache_t>(values[e] / scale);
    }
#pragma unroll
    for (int v = 0; v < kCacheVecs; ++v) {
      store_vec(destination + v * kElemsPerVec<cache_t>, packed[v]);
    }
  }
}

// All heads of one token's key (or value) into its slot (block, offset).
template <typename input_t, typename cache_t>
__device__ __forceinline__ void write_token(const input_t* token_rows,  // [num_kv_heads, head_size]
                                           int64_t input_head_stride,
                                           cache_t* cache,  // [num_blocks, block_size, num_kv_heads, head_size]
                                           const CacheLayout& layout, int64_t block,
                                           int64_t offset, float scale) {
  constexpr int kUnit = kWriteUnitElems<input_t, cache_t>;
  const int units_per_row = static_cast<int>(layout.head_size / kUnit);
  const int total_units = static_cast<int>(layout.num_kv_heads) * units_per_row;
  cache_t* slot = cache + block * layout.block_stride + offset * layout.token_stride;
  // Thread t moves units t, t + 128, ...: consecutive threads take consecutive units of a row,
  // then of the next head's row, so the warp's 16-byte accesses are adjacent within each row.
  for (int i = threadIdx.x; i < total_units; i += kCacheThreads) {
    const int head = i / units_per_row;
    const int element = (i % units_per_row) * kUnit;
    write_unit<input_t, cache_t>(token_rows + head * input_head_stride + element,
                                 slot + head * layout.head_stride + element, scale);
  }
}

// One block per token: token blockIdx.x goes to slot slot_mapping[token] (skipped when -1).
template <typename input_t, typename cache_t>
__global__ void __launch_bounds__(kCacheThreads) write_kv_kernel(const WriteKVParams params) {
  const int64_t token = blockIdx.x;
  const int64_t slot = params.slot_mapping[token];
  if (slot < 0) return;
  const int64_t block_size = params.key_layout.block_size;
  const int64_t block = slot / block_size;
  const int64_t offset = slot % block_size;
  KASSERT(block < params.key_layout.num_blocks);
  const float k_scale = params.k_scale != nullptr ? *params.k_scale : 1.0f;
  const float v_scale = params.v_scale != nullptr ? *params.v_scale : 1.0f;
  write_token(static_cast<const input_t*>(params.key) + token * params.key_token_stride,
              params.key_head_stride, static_cast<cache_t*>(params.key_cache), params.key_layout,
              block, offset, k_scale);
  write_token(static_cast<const input_t*>(params.value) + token * params.value_token_stride,
              params.value_head_stride, static_cast<cache_t*>(params.value_cache),
              params.value_layout, block, offset, v_scale);
}

// copy_blocks takes the per-layer base pointers by value in its parameters (no device array to
// build, nothing for a CUDA graph to capture but the launch). Up to kMaxLayers layers per
// launch keep the parameters under the 4 KiB kernel-parameter limit.
struct CopyBlocksKernelParams {
  static constexpr int kMaxLayers = 128;
  unsigned char* key_caches[kMaxLayers];    // per layer: [num_blocks, block_size, num_kv_heads, head_size]
  unsigned char* value_caches[kMaxLayers];  // per layer: same shape, value_layout
  CacheLayout key_layout;
  CacheLayout value_layout;
  const int64_t* block_mapping;  // [num_pairs, 2] (src, dst)
  int64_t element_bytes;
};

// Copies block src over block dst of one cache: block_size * num_kv_heads rows of head_size
// elements, each row whole 16-byte vectors. Thread t copies vectors t, t + 128, ... of the
// block's rows in (token, head, vector) order, so adjacent threads copy adjacent bytes.
__device__ __forceinline__ void copy_block(
    unsigned char* cache,  // bytes of [num_blocks, block_size, num_kv_heads, head_size] (layout)
    const CacheLayout& layout, int64_t element_bytes, int64_t src, int64_t dst) {
  const int row_vecs = static_cast<int>(layout.head_size * element_bytes / kVecBytes);
  const int rows = static_cast<int>(layout.block_size * layout.num_kv_heads);
  for (int i = threadIdx.x; i < rows * row_vecs; i += kCacheThreads) {
    const int row = i / row_vecs;
    const int64_t token = row / layout.num_kv_heads;
    const int64_t head = row % layout.num_kv_heads;
    const int64_t within_block =
        (token * layout.token_stride + head * layout.head_stride) * element_bytes +
        static_cast<int64_t>(i % row_vecs) * kVecBytes;
    store_vec(cache + dst * layout.block_stride * element_bytes + within_block,
              load_vec(cache + src * layout.block_stride * element_bytes + within_block));
  }
}

// Grid (num_pairs, layers in this launch): pairs on x, whose limit is 2^31 - 1 rather than 65535.
__global__ void __launch_bounds__(kCacheThreads)
    copy_blocks_kernel(const CopyBlocksKernelParams params) {
  const int64_t pair = blockIdx.x;
  const int layer = blockIdx.y;
  const int64_t src = params.block_mapping[2 * pair];
  const int64_t dst = params.block_mapping[2 * pair + 1];
  KASSERT(src >= 0 && src < params.key_layout.num_blocks);
  KASSERT(dst >= 0 && dst < params.key_layout.num_blocks);
  copy_block(params.key_caches[layer], params.key_layout, params.element_bytes, src, dst);
  copy_block(params.value_caches[layer], params.value_layout, params.element_bytes, src, dst);
}

}  // namespace paged_attn::kernels
