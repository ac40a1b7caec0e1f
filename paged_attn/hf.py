"""transformers integration: the "paged_attn" attention function and its mask function.

`import paged_attn.hf` registers both under the name "paged_attn", in `AttentionInterface` and in
`AttentionMaskInterface` (without a registered mask function transformers passes no mask at all
and padding is silently ignored). Load a model with `attn_implementation="paged_attn"`, or switch
a loaded one with `enable(model)`, and pass a `PagedKVCache` as `past_key_values`.

The hand-off, per forward pass (docs_hf.md tells it in full):
  1. The model builds its masks once: our mask function returns a `PagedMask`, which keeps the
     2D padding mask and the sizes, and builds no dense mask.
  2. In each layer, `PagedKVCache.update()` stages the new K/V and returns them unchanged.
  3. The attention function claims the staged K/V (`take_staged_cache`), reads which new tokens
     are real from the `PagedMask`, and commits them: padding gets slot -1. One new token per
     row is a decode step and runs the `paged_attention` op on the pages; several are a prefill,
     computed exactly over each sequence's cached prefix plus its new tokens.
With any other cache (or none) the function attends over the dense K/V it is given, with the
mask transformers' sdpa path would use: a true drop-in. Window, soft-cap and scaling always come
from the call's kwargs, never from the config, because hybrid models vary them per layer.
"""

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from paged_attn.kv_cache import ForwardStep, PagedKVCache, take_staged_cache
from paged_attn.ops import paged_attention

ATTN_IMPLEMENTATION = "paged_attn"


@dataclass(frozen=True, eq=False)
class PagedMask:
    """What the "paged_attn" mask function passes to the attention function: no dense mask.

    `padding_mask` is the forward pass's 2D mask [batch, past + new] (True for real tokens) or
    None when nothing is padded. `mask_kwargs` are the mask function's arguments, kept to build
    the dense mask only if the attention function is fed by a dense cache.
    """

    padding_mask: torch.Tensor | None  # [batch, query_offset + query_length] bool
    query_offset: int
    query_length: int
    mask_kwargs: dict = field(repr=False)

    def new_token_is_real(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """[batch, query_length] bool: which of this pass's tokens are not padding."""
        if self.padding_mask is None:
            return torch.ones(batch_size, self.query_length, dtype=torch.bool, device=device)
        end = self.query_offset + self.query_length
        if self.padding_mask.shape[-1] != end:
            raise ValueError(
                f"attention_mask has {self.padding_mask.shape[-1]} columns but the cache has seen "
                f"{self.query_offset} positions and {self.query_length} are new: pass a mask that "
                "covers past and new tokens")
        return self.padding_mask[:, self.query_offset:end].bool()

    def dense(self) -> torch.Tensor:
        """[batch, 1, query_length, kv_length] bool, exactly the mask sdpa would get."""
        return sdpa_mask(**{**self.mask_kwargs, "allow_is_causal_skip": False})


def paged_attn_mask(**mask_kwargs) -> PagedMask:
    """The mask function registered for "paged_attn": keeps the padding mask, builds nothing."""
    query_offset = mask_kwargs.get("q_offset", 0)
    return PagedMask(
        padding_mask=mask_kwargs.get("attention_mask"),
        query_offset=int(query_offset),
        query_length=mask_kwargs["q_length"],
        mask_kwargs=mask_kwargs,
    )


def attend(
    query: torch.Tensor,    # [batch, num_heads, num_queries, head_dim]
    key: torch.Tensor,      # [batch, num_kv_heads, num_keys, head_dim]
    value: torch.Tensor,    # [batch, num_kv_heads, num_keys, head_dim]
    allowed: torch.Tensor,  # [batch or 1, 1, num_queries, num_keys] bool
    scale: float,
    softcap: float | None,
) -> torch.Tensor:          # [batch, num_queries, num_heads, head_dim], query's dtype
    """Exact attention in float32: scale, soft-cap, mask, softmax; a query with no key gives 0."""
    group_size = query.shape[1] // key.shape[1]
    key = key.float().repeat_interleave(group_size, dim=1)
    value = value.float().repeat_interleave(group_size, dim=1)
    scores = torch.matmul(query.float(), key.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    probabilities = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probabilities = probabilities.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    return torch.matmul(probabilities, value).transpose(1, 2).to(query.dtype)


def _dense_allowed(attention_mask, module, num_queries: int, num_keys: int, device,
                   is_causal: bool | None) -> torch.Tensor:  # [batch or 1, 1, num_queries, num_keys]
    """The boolean mask of a call fed by a dense cache, read the way transformers' sdpa does."""
    if isinstance(attention_mask, PagedMask):
        return attention_mask.dense()
    if attention_mask is None:
        if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
            return torch.ones(1, 1, num_queries, num_keys, dtype=torch.bool, device=device)
        query_positions = torch.arange(num_keys - num_queries, num_keys, device=device)
        return (torch.arange(num_keys, device=device) <= query_positions[:, None])[None, None]
    if attention_mask.dtype != torch.bool:
        raise TypeError(f"paged_attn takes boolean 4D masks, got {attention_mask.dtype}")
    return attention_mask


def _decode(cache: PagedKVCache, layer_idx: int, query: torch.Tensor, step: ForwardStep,
            scale: float, sliding_window: int | None, softcap: float | None) -> torch.Tensor:
    """One new token per row: the paged_attention op over the pages. Returns [batch, 1, heads, dim]."""
    layer = cache.layers[layer_idx]
    seq_lens = torch.where(step.is_real[:, 0].to(step.seq_lens.device), step.seq_lens, 0)
    out = paged_attention(
        query[:, :, 0, :].contiguous(), layer.key_cache, layer.value_cache, step.block_tables,
        seq_lens, scale=scale, max_seq_len=step.max_seq_len, sliding_window=sliding_window,
        logits_soft_cap=softcap, k_scale=layer.k_scale, v_scale=layer.v_scale)
    return out.unsqueeze(1)


@dataclass(frozen=True)
class _PrefillRow:
    """One sequence's share of a prefill: the same in every layer that has the same window."""

    row: int
    columns: torch.Tensor  # [num_real] int64, the row's real (not padding) new-token columns
    slots: torch.Tensor    # [num_keys] int64, cache slots of the keys its queries may see
    allowed: torch.Tensor  # [1, 1, num_real, num_keys] bool, causal (and window) mask


def _prefill_rows(cache: PagedKVCache, step: ForwardStep,
                  sliding_window: int | None) -> list[_PrefillRow]:
    """The prefill's rows under this window, planned by the first layer that asks for them.

    Only the positions some query can see are planned (the window's, under a sliding window),
    never a max-length buffer. Rows of padding alone are left out.
    """
    window = sliding_window or None
    planned = step.prefill_rows.get(window)
    if planned is not None:
        return planned
    planned = []
    for row, seq_id in enumerate(step.seq_ids):
        columns = step.is_real[row].nonzero().squeeze(1)
        if columns.numel() == 0:
            continue
        first_query = step.start_lens[row]
        first_key = max(0, first_query - window + 1) if window else 0
        slots = cache.position_slots(seq_id, first_key)
        query_positions = torch.arange(first_query, first_query + columns.numel(),
                                       device=slots.device)
        key_positions = torch.arange(first_key, first_key + slots.numel(), device=slots.device)
        allowed = key_positions[None, :] <= query_positions[:, None]
        if window:
            allowed &= key_positions[None, :] > query_positions[:, None] - window
        planned.append(_PrefillRow(row, columns, slots, allowed[None, None]))
    step.prefill_rows[window] = planned
    return planned


def _prefill(cache: PagedKVCache, layer_idx: int, query: torch.Tensor, step: ForwardStep,
             scale: float, sliding_window: int | None, softcap: float | None) -> torch.Tensor:
    """Several new tokens: each sequence's real queries over its cached prefix and new tokens.

    Padding rows of the output are 0. Returns [batch, new, heads, dim].
    """
    batch_size, num_heads, num_new, head_dim = query.shape
    out = query.new_zeros(batch_size, num_new, num_heads, head_dim)
    for plan in _prefill_rows(cache, step, sliding_window):
        keys, values = cache.read_slots(layer_idx, plan.slots)
        out[plan.row, plan.columns] = attend(
            query[plan.row : plan.row + 1, :, plan.columns], keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None], plan.allowed, scale, softcap)[0]
    return out


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,          # [batch, num_heads, num_new, head_dim]
    key: torch.Tensor,            # [batch, num_kv_heads, num_keys, head_dim]
    value: torch.Tensor,          # [batch, num_kv_heads, num_keys, head_dim]
    attention_mask,               # PagedMask, [batch, 1, num_new, num_keys] bool, or None
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:  # [batch, num_new, num_heads, head_dim]
    """The attention function registered as "paged_attn" (inference only: no dropout)."""
    if dropout:
        raise ValueError("paged_attn is for inference: attention dropout is not supported")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    cache = take_staged_cache(module.layer_idx, key)
    if cache is None:
        allowed = _dense_allowed(attention_mask, module, query.shape[2], key.shape[2],
                                 query.device, is_causal)
        return attend(query, key, value, allowed, scale, softcap), None
    if attention_mask is None:
        is_real = torch.ones(query.shape[0], query.shape[2], dtype=torch.bool, device=query.device)
    elif isinstance(attention_mask, PagedMask):
        is_real = attention_mask.new_token_is_real(query.shape[0], query.device)
    else:
        raise TypeError("a PagedKVCache needs the 'paged_attn' mask function, not a prepared mask")
    step = cache.commit_staged(module.layer_idx, is_real, sliding_window)
    attention = _decode if query.shape[2] == 1 else _prefill
    return attention(cache, module.layer_idx, query, step, scale, sliding_window, softcap), None


def enable(model):
    """Switch an already loaded model to the "paged_attn" attention; returns the model."""
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, paged_attn_mask)
