"""Typed Python wrappers for the paged_attn ops, and their fake implementations.

This is the only module that touches `torch.ops.paged_attn`. The schemas themselves live in
csrc/core/schemas.h (the one schema source); here we only add Python conveniences (defaults,
allocation of `out`) and the `register_fake` functions that let `torch.compile(fullgraph=True)`
trace the ops. Every op mutates its outputs in place and returns nothing, so each fake
implementation only has to exist.

Cache layout: [num_blocks, block_size, num_kv_heads, head_size]; any strides, last dim contiguous.
"""

from collections.abc import Sequence

import torch

OPS = torch.ops.paged_attn
OP_NAMES = ("paged_attention", "write_kv", "copy_blocks", "swap_blocks")


def paged_attention(
    query: torch.Tensor,         # [num_seqs, num_heads, head_size]
    key_cache: torch.Tensor,     # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,   # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,      # [num_seqs] int32
    *,
    scale: float | None = None,
    max_seq_len: int | None = None,
    alibi_slopes: torch.Tensor | None = None,  # [num_heads] float32
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,       # [1] float32, fp8 caches only
    v_scale: torch.Tensor | None = None,       # [1] float32, fp8 caches only
    out: torch.Tensor | None = None,           # [num_seqs, num_heads, head_size]
) -> torch.Tensor:                             # [num_seqs, num_heads, head_size]
    """Decode attention: one query token per sequence against its paged K/V history.

    `scale` defaults to head_size ** -0.5. `max_seq_len` bounds `seq_lens`; pass it on CUDA,
    where computing it from `seq_lens` costs a device-to-host sync (and a graph break under
    torch.compile). `sliding_window` and `logits_soft_cap` of None or 0 mean off.
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if seq_lens.numel() else 0
    if out is None:
        out = torch.empty_like(query)
    OPS.paged_attention(
        out, query, key_cache, value_cache, block_tables, seq_lens, float(scale), int(max_seq_len),
        alibi_slopes, int(sliding_window or 0), float(logits_soft_cap or 0.0), k_scale, v_scale)
    return out


def write_kv(
    key: torch.Tensor,           # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,         # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,     # [num_blocks, block_size, num_kv_heads, head_size], written
    value_cache: torch.Tensor,   # [num_blocks, block_size, num_kv_heads, head_size], written
    slot_mapping: torch.Tensor,  # [num_tokens] int64, block * block_size + offset; -1 skips
    *,
    k_scale: torch.Tensor | None = None,  # [1] float32, fp8 caches only
    v_scale: torch.Tensor | None = None,  # [1] float32, fp8 caches only
) -> None:
    """Stores each token's key and value in its cache slot (fp8 caches quantize with the scales)."""
    OPS.write_kv(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def copy_blocks(
    key_caches: Sequence[torch.Tensor],    # per layer [num_blocks, block_size, num_kv_heads, head_size]
    value_caches: Sequence[torch.Tensor],  # per layer, same shape as key_caches
    block_mapping: torch.Tensor,           # [num_pairs, 2] int64 (src, dst), caches' device
) -> None:
    """Copies block src over block dst, for every pair, in every layer's key and value cache."""
    OPS.copy_blocks(list(key_caches), list(value_caches), block_mapping)


def swap_blocks(
    src: torch.Tensor,            # [num_src_blocks, block_size, num_kv_heads, head_size]
    dst: torch.Tensor,            # [num_dst_blocks, block_size, num_kv_heads, head_size], written
    block_mapping: torch.Tensor,  # [num_pairs, 2] int64 (src, dst), on the CPU
) -> None:
    """Copies whole blocks between two caches, possibly on different devices (GPU <-> CPU)."""
    OPS.swap_blocks(src, dst, block_mapping.cpu())


def _register_fakes() -> None:
    """Fake kernels for tracing: the ops only mutate their (a!)/(b!) arguments."""

    def mutates_only(*args, **kwargs) -> None:
        return None

    for name in OP_NAMES:
        torch.library.register_fake(f"paged_attn::{name}")(mutates_only)


_register_fakes()
