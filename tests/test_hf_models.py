"""End-to-end tests of the "paged_attn" attention with PagedKVCache, one per model family.

Each family is a tiny random-weight model built from its config (no downloads), run twice with
the same weights: stock transformers (sdpa + DynamicCache; eager for Gemma2, which has no sdpa
path) and "paged_attn" + PagedKVCache. Random weights give near-uniform attention and near-tied
logits, so `sharpened` scales the query/key projections (softmax, window and soft-cap then
matter) and the LM head (greedy tokens then do not flip on rounding).

The families cover: plain attention (Llama); every layer sliding, window smaller than the
prompt (Mistral); sliding and full layers alternating (Qwen2); soft-cap, window and
query_pre_attn_scalar scaling (Gemma2); GQA 4:1 with head_dim != hidden / heads (Qwen3).
The builders here are shared with test_hf_features.py.
"""

import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

import paged_attn.hf  # noqa: F401  (registers "paged_attn")
from paged_attn import PagedKVCache

VOCAB = 96
BLOCK_SIZE = 4
WINDOW = 6
PROMPT_LENGTHS = (11, 8, 5)  # left-padded to 11
NEW_TOKENS = 22
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
               tie_word_embeddings=False)

FAMILIES = {
    "llama": (LlamaConfig(**_COMMON), "sdpa"),
    "mistral": (MistralConfig(**_COMMON, sliding_window=WINDOW), "sdpa"),
    "qwen2": (Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=WINDOW,
                          max_window_layers=1), "sdpa"),
    "gemma2": (Gemma2Config(**_COMMON, head_dim=32, sliding_window=WINDOW,
                            attn_logit_softcapping=2.0, query_pre_attn_scalar=20), "eager"),
    "qwen3": (Qwen3Config(**{**_COMMON, "num_attention_heads": 8}, head_dim=16), "sdpa"),
}


def sharpened(model):
    """Scale q/k projections by 6 and the LM head by 8, in place; returns the model."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(6.0)
        model.lm_head.weight.mul_(8.0)
    return model


def model_pair(family: str, dtype: torch.dtype = torch.float32):
    """(stock, paged): the same random weights, stock attention and "paged_attn"."""
    config, stock_attention = FAMILIES[family]
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=stock_attention,
                                             dtype=dtype)
    sharpened(stock.eval())
    paged = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="paged_attn",
                                             dtype=dtype)
    paged.load_state_dict(stock.state_dict())
    return stock, paged.eval()


def left_padded_batch(lengths=PROMPT_LENGTHS, seed: int = 1):
    """input_ids and attention_mask [len(lengths), max(lengths)]: random prompts, left-padded."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(1, VOCAB, (len(lengths), width), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, width - length:] = 1
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def paged_cache(model, num_blocks: int = 96, **kwargs) -> PagedKVCache:
    return PagedKVCache.from_model(model, num_blocks=num_blocks, block_size=BLOCK_SIZE, **kwargs)


def positions_of(attention_mask):
    """Position ids of a left-padded batch, as generate() derives them (padding at 0 here)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def teacher_forced_logits(model, cache, input_ids, attention_mask, chunks):
    """Logits [batch, width, vocab] of feeding the columns in `chunks` (lengths) in turn."""
    logits, start = [], 0
    positions = positions_of(attention_mask)
    for length in chunks:
        end = start + length
        out = model(input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                    position_ids=positions[:, start:end], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        start = end
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_greedy_generate_matches_stock(family):
    stock, paged = model_pair(family)
    input_ids, attention_mask = left_padded_batch()
    settings = dict(attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                    do_sample=False, pad_token_id=0)
    expected = stock.generate(input_ids, **settings)
    cache = paged_cache(paged)
    actual = paged.generate(input_ids, past_key_values=cache, **settings)

    assert torch.equal(actual, expected)
    # The pages, not a dense fallback, held the run: real tokens only, padding never stored.
    fed_back = attention_mask.sum(dim=1) + NEW_TOKENS - 1
    assert [cache.seq_len(seq_id) for seq_id in cache.batch] == fed_back.tolist()
    assert cache.get_seq_length() == input_ids.shape[1] + NEW_TOKENS - 1


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_prefill_and_decode_logits_match_stock(family):
    """Chunked prefill (the second chunk over a cached prefix), then decode, against one full pass."""
    stock, paged = model_pair(family)
    input_ids, attention_mask = left_padded_batch(lengths=(19, 14, 9), seed=2)
    expected = stock(input_ids, attention_mask=attention_mask,
                     position_ids=positions_of(attention_mask)).logits
    cache = paged_cache(paged)
    actual = teacher_forced_logits(paged, cache, input_ids, attention_mask, chunks=[7, 5] + [1] * 7)

    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=1e-4)
