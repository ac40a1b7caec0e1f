// The one schema source for every paged_attn op.
//
// kOpSchemas lists every op. torch_bindings.cpp defines them in TORCH_LIBRARY(paged_attn)
// and the emulator test extension defines the same list in TORCH_LIBRARY(paged_attn_sim),
// so the two can never disagree. Nothing else (Python included) restates a schema.
//
// Semantics, shared by every backend and written out in paged_attn/reference.py:
//
// paged_attention: decode attention of one query token per sequence over a paged cache.
//   out           [num_seqs, num_heads, head_size]      written; same dtype as query
//   query         [num_seqs, num_heads, head_size]      fp32 / fp16 / bf16
//   key_cache     [num_blocks, block_size, num_kv_heads, head_size]  any strides, last dim contiguous
//   value_cache   [num_blocks, block_size, num_kv_heads, head_size]  same dtype as query, or float8_e4m3fn
//   block_tables  [num_seqs, max_blocks] int32, entries past a sequence's last block may be -1
//   seq_lens      [num_seqs] int32; 0 gives an all-zero output row
//   scale         multiplies q.k
//   max_seq_len   host upper bound of seq_lens (no device sync needed to size the launch)
//   alibi_slopes  [num_heads] float32: adds slope_h * (pos - (seq_len - 1))
//   sliding_window  > 0: only positions >= seq_len - sliding_window are attended
//   logits_soft_cap > 0: s = cap * tanh(s / cap), applied before ALiBi
//   k_scale, v_scale  [1] float32, required iff the cache is fp8: real value = fp8 * scale
//   Query head h reads KV head h / (num_heads / num_kv_heads).
//
// write_kv: stores new tokens' K and V into their cache slots.
//   key, value    [num_tokens, num_kv_heads, head_size]
//   slot_mapping  [num_tokens] int64, slot = block * block_size + offset; -1 skips the token
//   fp8 caches store exactly (x / scale).to(float8_e4m3fn): saturating, round to nearest even.
//
// copy_blocks: for every (src, dst) row of block_mapping [n, 2] int64, copies block src to
//   block dst in every layer's key and value cache (copy-on-write, fork, beam search).
//
// swap_blocks: copies whole blocks between two caches of equal block shape and dtype, possibly
//   on different devices; block_mapping [n, 2] int64 (src, dst) lives on the CPU.
#pragma once

namespace paged_attn {

inline constexpr const char* kOpSchemas[] = {
    "paged_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
    "Tensor block_tables, Tensor seq_lens, float scale, int max_seq_len, "
    "Tensor? alibi_slopes=None, int sliding_window=0, float logits_soft_cap=0.0, "
    "Tensor? k_scale=None, Tensor? v_scale=None) -> ()",

    "write_kv(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
    "Tensor slot_mapping, Tensor? k_scale=None, Tensor? v_scale=None) -> ()",

    "copy_blocks(Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, Tensor block_mapping) -> ()",

    "swap_blocks(Tensor src, Tensor(a!) dst, Tensor block_mapping) -> ()",
};

}  // namespace paged_attn
