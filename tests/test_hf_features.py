"""Tests of the transformers features around PagedKVCache: forks, memory, dtypes, drop-in use.

Beam search and parallel sampling must reuse blocks through fork and copy-on-write; a model
where every layer slides must release old blocks; fp8 and bf16 pools must stay accurate; the
attention function must stay correct with a plain DynamicCache; an engine-style batch with
ragged new tokens must work through the sequence API. Models come from test_hf_models.py.
"""

import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

import paged_attn.hf
from paged_attn import kv_cache as kv_cache_module
from test_hf_models import (
    BLOCK_SIZE,
    FAMILIES,
    NEW_TOKENS,
    VOCAB,
    WINDOW,
    left_padded_batch,
    model_pair,
    paged_cache,
    positions_of,
    teacher_forced_logits,
)

GREEDY = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)


@pytest.fixture
def copied_blocks(monkeypatch):
    """Every (src, dst) pair the cache copies, in order."""
    pairs = []
    original = kv_cache_module.copy_blocks

    def recording(key_caches, value_caches, block_mapping):
        pairs.extend(map(tuple, block_mapping.tolist()))
        original(key_caches, value_caches, block_mapping)

    monkeypatch.setattr(kv_cache_module, "copy_blocks", recording)
    return pairs


def live_blocks(cache, seq_id):
    return [block for block in cache.block_ids(seq_id) if block >= 0]


@torch.no_grad()
def test_beam_search_matches_stock_and_copies_only_on_write(copied_blocks):
    stock, paged = model_pair("llama")
    input_ids, attention_mask = left_padded_batch()
    settings = dict(attention_mask=attention_mask, num_beams=3, do_sample=False, **GREEDY)
    expected = stock.generate(input_ids, **settings)
    cache = paged_cache(paged, num_blocks=160)
    actual = paged.generate(input_ids, past_key_values=cache, **settings)

    assert torch.equal(actual, expected)
    # Copy-on-write copies at most one partial block per row and step; copying whole beams on
    # every reorder would copy every block of every row.
    rows, steps = len(cache.batch), NEW_TOKENS - 1
    assert len(copied_blocks) <= rows * steps
    held = sum(len(live_blocks(cache, seq_id)) for seq_id in cache.batch)
    assert cache.allocator.num_used_blocks < held  # beams share their common prefix


@torch.no_grad()
def test_num_return_sequences_matches_stock():
    stock, paged = model_pair("qwen2")
    input_ids, attention_mask = left_padded_batch()
    settings = dict(attention_mask=attention_mask, do_sample=True, top_k=0,
                    num_return_sequences=3, **GREEDY)
    torch.manual_seed(7)
    expected = stock.generate(input_ids, **settings)
    torch.manual_seed(7)
    actual = paged.generate(input_ids, past_key_values=paged_cache(paged, num_blocks=160), **settings)
    assert torch.equal(actual, expected)


@torch.no_grad()
def test_batch_repeat_interleave_forks_a_shared_prompt(copied_blocks):
    """Prefill each prompt once, fork it 3 ways, sample: as stock, sharing the prompt's blocks."""
    stock, paged = model_pair("mistral")
    input_ids, attention_mask = left_padded_batch()
    positions = positions_of(attention_mask)

    def prefill(model, cache):
        model(input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
              position_ids=positions[:, :-1], past_key_values=cache, use_cache=True)

    def sample(model, cache):
        torch.manual_seed(11)
        return model.generate(input_ids, attention_mask=attention_mask, past_key_values=cache,
                              do_sample=True, top_k=0, num_return_sequences=3, **GREEDY)

    dense = DynamicCache(config=stock.config)
    prefill(stock, dense)
    dense.batch_repeat_interleave(3)
    cache = paged_cache(paged)
    prefill(paged, cache)
    used_by_prompts = cache.allocator.num_used_blocks
    cache.batch_repeat_interleave(3)
    assert cache.allocator.num_used_blocks == used_by_prompts and not copied_blocks
    assert len(cache.batch) == 3 * input_ids.shape[0]

    assert torch.equal(sample(paged, cache), sample(stock, dense))
    # Only the partial last prompt block is copied, once per fork that writes into it.
    assert len(copied_blocks) <= 2 * input_ids.shape[0]


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_dense_caches_still_get_exact_attention(family):
    """Drop-in: "paged_attn" with transformers' own DynamicCache, and with no cache at all."""
    stock, paged = model_pair(family)
    input_ids, attention_mask = left_padded_batch()
    settings = dict(attention_mask=attention_mask, do_sample=False, **GREEDY)
    assert torch.equal(paged.generate(input_ids, **settings), stock.generate(input_ids, **settings))

    without_cache = dict(attention_mask=attention_mask, position_ids=positions_of(attention_mask),
                         use_cache=False)
    real = attention_mask.bool()
    torch.testing.assert_close(paged(input_ids, **without_cache).logits[real],
                               stock(input_ids, **without_cache).logits[real], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_enable_switches_a_loaded_model():
    stock, _ = model_pair("llama")
    input_ids, attention_mask = left_padded_batch()
    settings = dict(attention_mask=attention_mask, do_sample=False, **GREEDY)
    expected = stock.generate(input_ids, **settings)
    switched = paged_attn.hf.enable(stock)
    assert switched.config._attn_implementation == "paged_attn"
    cache = paged_cache(switched)
    assert torch.equal(switched.generate(input_ids, past_key_values=cache, **settings), expected)
    assert cache.allocator.num_used_blocks > 0


@torch.no_grad()
def test_every_layer_sliding_releases_blocks_outside_the_window():
    _, mistral = model_pair("mistral")
    _, qwen2 = model_pair("qwen2")  # alternates sliding and full layers: keeps everything
    input_ids, attention_mask = left_padded_batch()
    settings = dict(attention_mask=attention_mask, do_sample=False, **GREEDY)
    sliding, mixed = paged_cache(mistral), paged_cache(qwen2)
    mistral.generate(input_ids, past_key_values=sliding, **settings)
    qwen2.generate(input_ids, past_key_values=mixed, **settings)

    # A step appends to at most WINDOW visible tokens, which span at most this many blocks.
    window_blocks = (WINDOW - 1) // BLOCK_SIZE + 2
    longest_prompt_blocks = -(-input_ids.shape[1] // BLOCK_SIZE)
    for seq_id in sliding.batch:
        assert len(live_blocks(sliding, seq_id)) <= window_blocks
    assert sliding.peak_used_blocks <= len(sliding.batch) * max(window_blocks, longest_prompt_blocks)
    for seq_id in mixed.batch:
        assert len(live_blocks(mixed, seq_id)) == -(-mixed.seq_len(seq_id) // BLOCK_SIZE)


@torch.no_grad()
def test_fp8_pools_quantize_with_their_scales():
    """fp8 pools hold K/V divided by per-layer scales; logits stay close to fp32."""
    stock, paged = model_pair("gemma2")
    input_ids, attention_mask = left_padded_batch(lengths=(12, 9), seed=3)
    chunks = [8] + [1] * 4
    exact_cache = paged_cache(paged)
    exact = teacher_forced_logits(paged, exact_cache, input_ids, attention_mask, chunks)
    fp8_cache = paged_cache(paged, dtype=torch.float8_e4m3fn, k_scale=0.05, v_scale=0.02)
    approximate = teacher_forced_logits(paged, fp8_cache, input_ids, attention_mask, chunks)

    layer, exact_layer = fp8_cache.layers[0], exact_cache.layers[0]
    assert layer.key_cache.dtype == torch.float8_e4m3fn
    for seq_id in fp8_cache.batch:
        keys, values = fp8_cache.gather(0, seq_id, 0)
        exact_keys, exact_values = exact_cache.gather(0, seq_id, 0)
        torch.testing.assert_close(keys, exact_keys, rtol=2**-3, atol=0.05 * 2**-9)
        torch.testing.assert_close(values, exact_values, rtol=2**-3, atol=0.02 * 2**-9)
    real = attention_mask.bool()
    assert (approximate[real] - exact[real]).abs().max() < 0.05 * exact[real].abs().max()


@torch.no_grad()
def test_bf16_error_is_within_twice_stock_bf16_error():
    stock32, paged32 = model_pair("qwen3")
    stock16, paged16 = model_pair("qwen3", dtype=torch.bfloat16)
    chunks = [6, 5] + [1] * 4
    input_ids, attention_mask = left_padded_batch(lengths=(15, 12, 9), seed=4)
    full = dict(attention_mask=attention_mask, position_ids=positions_of(attention_mask))
    truth = stock32(input_ids, **full).logits
    stock_error = (stock16(input_ids, **full).logits.float() - truth).abs()
    paged_logits = teacher_forced_logits(paged16, paged_cache(paged16), input_ids, attention_mask, chunks)
    paged_error = (paged_logits.float() - truth).abs()
    real = attention_mask.bool()
    assert paged_error[real].max() <= 2 * stock_error[real].max() + 1e-2


@torch.no_grad()
def test_padding_is_never_stored_or_read():
    """Pools start as NaN: any read of a slot that padding (or nobody) wrote would show up."""
    stock, paged = model_pair("qwen2")
    input_ids, attention_mask = left_padded_batch()
    cache = paged_cache(paged)
    for layer in cache.layers:
        layer.key_cache.fill_(float("nan"))
        layer.value_cache.fill_(float("nan"))
    settings = dict(attention_mask=attention_mask, do_sample=False, **GREEDY)
    assert torch.equal(paged.generate(input_ids, past_key_values=cache, **settings),
                       stock.generate(input_ids, **settings))
    stored = sum(cache.seq_len(seq_id) for seq_id in cache.batch)
    written = sum(int((~layer.key_cache.isnan()).all(dim=(2, 3)).sum()) for layer in cache.layers)
    assert written == stored * len(cache.layers)


@torch.no_grad()
def test_cache_reports_hf_positions_and_mask_sizes():
    _, paged = model_pair("llama")
    input_ids, attention_mask = left_padded_batch()
    cache = paged_cache(paged)
    paged(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    width = input_ids.shape[1]
    assert cache.get_seq_length() == width
    assert cache.get_mask_sizes(1, layer_idx=1) == (width + 1, 0)
    assert [cache.seq_len(seq_id) for seq_id in cache.batch] == attention_mask.sum(dim=1).tolist()


@torch.no_grad()
def test_engine_style_ragged_batch_with_explicit_positions():
    """Sequences of the sequence API, each with its own new-token count, padded on the right."""
    stock, paged = model_pair("gemma2")
    generator = torch.Generator().manual_seed(5)
    tokens = [torch.randint(1, VOCAB, (length,), generator=generator) for length in (9, 7)]
    cache = paged_cache(paged)
    first, second = cache.add_sequence(), cache.add_sequence()
    cache.batch = [first, second]
    steps = [(5, 3), (1, 4), (3, 0)]  # new tokens per sequence in each forward pass
    fed = [0, 0]
    paged_logits = [[], []]
    for counts in steps:
        width = max(counts)
        input_ids = torch.zeros(2, width, dtype=torch.long)
        position_ids = torch.zeros(2, width, dtype=torch.long)
        is_real = torch.zeros(2, width, dtype=torch.long)
        for row, count in enumerate(counts):
            input_ids[row, :count] = tokens[row][fed[row]:fed[row] + count]
            position_ids[row, :count] = torch.arange(fed[row], fed[row] + count)
            is_real[row, :count] = 1
        past = torch.ones(2, cache.get_seq_length(), dtype=torch.long)
        logits = paged(input_ids, attention_mask=torch.cat([past, is_real], dim=1),
                       position_ids=position_ids, past_key_values=cache, use_cache=True).logits
        for row, count in enumerate(counts):
            paged_logits[row].append(logits[row, :count])
            fed[row] += count

    for row in range(2):
        expected = stock(tokens[row][None]).logits[0]
        torch.testing.assert_close(torch.cat(paged_logits[row]), expected, atol=1e-4, rtol=1e-4)
        assert cache.seq_len(cache.batch[row]) == len(tokens[row])


@torch.no_grad()
def test_paged_cache_refuses_other_attention_implementations():
    stock, _ = model_pair("llama")
    input_ids, attention_mask = left_padded_batch()
    with pytest.raises(RuntimeError, match="paged_attn"):
        stock(input_ids, attention_mask=attention_mask, past_key_values=paged_cache(stock))


def test_import_paged_attn_does_not_import_transformers():
    check = "import sys, paged_attn; assert 'transformers' not in sys.modules, 'imported'"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
