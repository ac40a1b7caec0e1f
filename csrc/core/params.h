// Torch-free descriptions of each op's arguments: raw pointers, sizes and element strides.
//
// core/checks.cpp validates the ATen tensors and fills these structs; every backend (CPU
// kernels, CUDA launchers, the emulator) then works from the struct alone. Kernel code can
// include this header without pulling in ATen. Strides are counted in elements of the tensor's
// own dtype; the innermost (head_size) dimension is always contiguous.
#pragma once

#include <cstdint>
#include <vector>

namespace paged_attn {

enum class ScalarKind : int32_t { kFloat32, kFloat16, kBFloat16, kFloat8E4M3 };

// Geometry of one paged cache [num_blocks, block_size, num_kv_heads, head_size].
struct CacheLayout {
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t num_kv_heads = 0;
  int64_t head_size = 0;
  int64_t block_stride = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
  ScalarKind dtype = ScalarKind::kFloat32;

  // Element offset of (block, token-in-block, kv head); int64 so huge pools cannot overflow.
  int64_t offset(int64_t block, int64_t token, int64_t head) const {
    return block * block_stride + token * token_stride + head * head_stride;
  }
  // True when a block's tokens and heads are packed densely, so a block is one contiguous run.
  bool block_is_dense() const {
    return head_stride == head_size && token_stride == num_kv_heads * head_size;
  }
};

struct PagedAttentionParams {
  void* out;                    // [num_seqs, num_heads, head_size], dtype of query
  const void* query;            // [num_seqs, num_heads, head_size]
  const void* key_cache;        // [num_blocks, block_size, num_kv_heads, head_size] (key_layout)
  const void* value_cache;      // [num_blocks, block_size, num_kv_heads, head_size] (value_layout)
  const int32_t* block_tables;  // [num_seqs, max_blocks_per_seq]
  const int32_t* seq_lens;      // [num_seqs]
  const float* alibi_slopes;    // [num_heads] or nullptr
  const float* k_scale;         // [1] or nullptr; set iff the cache is fp8
  const float* v_scale;         // [1] or nullptr; set iff the cache is fp8
  int64_t out_seq_stride;
  int64_t out_head_stride;
  int64_t query_seq_stride;
  int64_t query_head_stride;
  int64_t block_table_stride;
  CacheLayout key_layout;
  CacheLayout value_layout;
  int32_t num_seqs;
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t head_size;
  int32_t max_blocks_per_seq;
  int32_t max_seq_len;
  ScalarKind query_dtype;
  float scale;
  int32_t sliding_window;   // 0 = off
  float logits_soft_cap;    // 0 = off

  int32_t queries_per_kv() const { return num_heads / num_kv_heads; }
};

struct WriteKVParams {
  const void* key;              // [num_tokens, num_kv_heads, head_size]
  const void* value;            // [num_tokens, num_kv_heads, head_size]
  void* key_cache;              // [num_blocks, block_size, num_kv_heads, head_size]
  void* value_cache;            // [num_blocks, block_size, num_kv_heads, head_size]
  const int64_t* slot_mapping;  // [num_tokens]; -1 skips the token
  const float* k_scale;         // [1] or nullptr; set iff the cache is fp8
  const float* v_scale;         // [1] or nullptr; set iff the cache is fp8
  int64_t key_token_stride;
  int64_t key_head_stride;
  int64_t value_token_stride;
  int64_t value_head_stride;
  CacheLayout key_layout;
  CacheLayout value_layout;
  int64_t num_tokens;
  ScalarKind input_dtype;
};

struct CopyBlocksParams {
  std::vector<void*> key_caches;    // one base pointer per layer; every layer has key_layout
  std::vector<void*> value_caches;  // one base pointer per layer; every layer has value_layout
  CacheLayout key_layout;
  CacheLayout value_layout;
  const int64_t* block_mapping;     // [num_pairs, 2] (src, dst), on the caches' device
  int64_t num_pairs;
};

struct SwapBlocksParams {
  const void* src;                  // [num_blocks_src, block_size, num_kv_heads, head_size]
  void* dst;                        // [num_blocks_dst, block_size, num_kv_heads, head_size]
  CacheLayout src_layout;
  CacheLayout dst_layout;
  const int64_t* block_mapping;     // [num_pairs, 2] (src, dst), always in host memory
  int64_t num_pairs;
  int64_t element_bytes;
};

}  // namespace paged_attn
