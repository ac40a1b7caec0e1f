"""Plain PyTorch float64 implementations of every paged_attn op: the test oracle and the spec.

Each function reads its inputs as they are (any dtype, any strides), computes in float64 and
returns new tensors instead of writing in place, so a test can compare a kernel's in-place result
with the oracle's. This module never imports the ops it checks.

Shapes:
  query          [num_seqs, num_heads, head_size]
  key/value_cache [num_blocks, block_size, num_kv_heads, head_size]
  block_tables   [num_seqs, max_blocks] int32, -1 past a sequence's last block
  seq_lens       [num_seqs] int32
"""

import torch

FP8 = torch.float8_e4m3fn


def dequantize(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Real float64 values of cache entries; an fp8 entry stands for `fp8 * scale`."""
    values = cache.to(torch.float64)
    if cache.dtype == FP8:
        values = values * scale.to(torch.float64)
    return values


def quantize(values: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """What write_kv stores for `values` in a cache of `cache_dtype`.

    fp8 is specified bit for bit as `(x / scale).to(float8_e4m3fn)` with the division in float32
    (PyTorch's promotion of a 16-bit tensor and a float32 scale), saturating, round to nearest even.
    """
    if cache_dtype == FP8:
        return (values.to(torch.float32) / scale.to(torch.float32)).to(FP8)
    return values.to(cache_dtype)


def attended_positions(seq_len: int, sliding_window: int) -> torch.Tensor:
    """Token positions a query at position seq_len - 1 attends: all, or the last `sliding_window`."""
    first = max(0, seq_len - sliding_window) if sliding_window > 0 else 0
    return torch.arange(first, seq_len)


def paged_attention(
    query: torch.Tensor,         # [num_seqs, num_heads, head_size]
    key_cache: torch.Tensor,     # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,   # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,      # [num_seqs] int32
    scale: float,
    *,
    alibi_slopes: torch.Tensor | None = None,  # [num_heads] float32
    sliding_window: int = 0,
    logits_soft_cap: float = 0.0,
    k_scale: torch.Tensor | None = None,       # [1] float32, fp8 caches only
    v_scale: torch.Tensor | None = None,       # [1] float32, fp8 caches only
) -> torch.Tensor:                             # [num_seqs, num_heads, head_size] float64
    """Decode attention of one query token per sequence over its paged K/V history."""
    num_seqs, num_heads, head_size = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group_size = num_heads // num_kv_heads
    out = torch.zeros(num_seqs, num_heads, head_size, dtype=torch.float64)
    for seq in range(num_seqs):
        seq_len = int(seq_lens[seq])
        if seq_len == 0:
            continue
        positions = attended_positions(seq_len, sliding_window)
        blocks = block_tables[seq].long()[positions // block_size]
        offsets = positions % block_size
        # [n, num_kv_heads, head_size] -> [n, num_heads, head_size], as HF's repeat_kv does.
        keys = dequantize(key_cache[blocks, offsets], k_scale).repeat_interleave(group_size, dim=1)
        values = dequantize(value_cache[blocks, offsets], v_scale).repeat_interleave(group_size, dim=1)
        scores = torch.einsum("hd,nhd->hn", query[seq].to(torch.float64), keys) * scale
        if logits_soft_cap > 0:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        if alibi_slopes is not None:
            distance = (positions - (seq_len - 1)).to(torch.float64)
            scores = scores + alibi_slopes.to(torch.float64)[:, None] * distance[None, :]
        out[seq] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), values)
    return out


def write_kv(
    key: torch.Tensor,           # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,         # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,     # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,   # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 skips the token
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the caches with each token stored at slot = block * block_size + offset."""
    block_size = key_cache.shape[1]
    new_key_cache, new_value_cache = key_cache.clone(), value_cache.clone()
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    new_key_cache[blocks, offsets] = quantize(key[keep], key_cache.dtype, k_scale)
    new_value_cache[blocks, offsets] = quantize(value[keep], value_cache.dtype, v_scale)
    return new_key_cache, new_value_cache


def copy_blocks(
    key_caches: list[torch.Tensor],    # per layer [num_blocks, block_size, num_kv_heads, head_size]
    value_caches: list[torch.Tensor],  # per layer [num_blocks, block_size, num_kv_heads, head_size]
    block_mapping: torch.Tensor,       # [num_pairs, 2] int64 (src, dst)
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Copies of every layer's caches with block src copied over block dst for every pair."""
    src, dst = block_mapping[:, 0], block_mapping[:, 1]

    def copied(cache: torch.Tensor) -> torch.Tensor:
        result = cache.clone()
        result[dst] = cache[src]
        return result

    return [copied(c) for c in key_caches], [copied(c) for c in value_caches]


def swap_blocks(
    src: torch.Tensor,            # [num_src_blocks, block_size, num_kv_heads, head_size]
    dst: torch.Tensor,            # [num_dst_blocks, block_size, num_kv_heads, head_size]
    block_mapping: torch.Tensor,  # [num_pairs, 2] int64 (src, dst), on the CPU
) -> torch.Tensor:
    """A copy of dst with block src[i] copied into block dst[j] for every pair (i, j)."""
    result = dst.clone()
    result[block_mapping[:, 1]] = src[block_mapping[:, 0]].to(dst.device)
    return result
