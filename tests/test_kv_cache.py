"""Tests of PagedKVCache's sequence-level API (paged_attn/kv_cache.py), without a model forward.

These pin what the continuous-batching engine relies on: sizing from a config or a memory budget,
slots and block tables, fork with copy-on-write in every layer, all-or-nothing appends, the
forward-pass protocol's refusal of inconsistent use, and reset.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from paged_attn import OutOfBlocksError, PagedKVCache

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 2, 2, 4, 4


def small_cache(num_blocks: int = 8) -> PagedKVCache:
    return PagedKVCache(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, num_blocks, BLOCK_SIZE)


def write_tokens(cache: PagedKVCache, slots: list[int], first_value: float) -> torch.Tensor:
    """Writes tokens whose K and V are all `first_value + i` in every layer; returns their keys."""
    values = torch.arange(len(slots), dtype=torch.float32) + first_value
    keys = values[:, None, None].expand(len(slots), NUM_KV_HEADS, HEAD_DIM).contiguous()
    for layer_idx in range(NUM_LAYERS):
        cache.write(layer_idx, keys, keys, torch.tensor(slots, dtype=torch.int64))
    return keys


def test_from_model_sizes_pools_from_the_config_or_a_budget():
    config = Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    cache = PagedKVCache.from_model(model, num_blocks=5, block_size=8)
    assert len(cache.layers) == 3
    assert cache.layers[0].key_cache.shape == (5, 8, 2, 16)  # head_dim is not 32 / 4
    pool_bytes = sum(layer.key_cache.nbytes + layer.value_cache.nbytes for layer in cache.layers)
    assert pool_bytes == 5 * cache.bytes_per_block

    budget = 7 * cache.bytes_per_block + cache.bytes_per_block - 1
    assert PagedKVCache.from_model(model, memory_budget_bytes=budget, block_size=8).num_blocks == 7
    fp8 = PagedKVCache.from_model(model, num_blocks=4, dtype=torch.float8_e4m3fn, k_scale=0.5)
    assert fp8.layers[2].key_cache.dtype == torch.float8_e4m3fn
    assert fp8.layers[2].k_scale.tolist() == [0.5] and fp8.layers[2].v_scale.tolist() == [1.0]
    with pytest.raises(ValueError, match="exactly one"):
        PagedKVCache.from_model(model, num_blocks=4, memory_budget_bytes=budget)


def test_slots_block_tables_and_gather_follow_the_tables():
    cache = small_cache()
    first, second = cache.add_sequence(), cache.add_sequence()
    slots = cache.append_tokens([first, second], [6, 2])
    first_keys = write_tokens(cache, slots[0], first_value=1.0)
    write_tokens(cache, slots[1], first_value=100.0)

    tables = cache.block_tables([first, second])
    assert tables.dtype == torch.int32 and tables.shape == (2, 2)
    assert tables[1, 1] == -1
    assert cache.seq_lens([first, second]).tolist() == [6, 2]
    for position, slot in enumerate(slots[0]):
        assert slot == tables[0, position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE
    keys, values = cache.gather(1, first, 2)
    assert torch.equal(keys, first_keys[2:]) and torch.equal(values, first_keys[2:])


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    cache = small_cache()
    parent = cache.add_sequence()
    prefix = write_tokens(cache, cache.append_tokens([parent], [6])[0], first_value=1.0)
    child = cache.fork_sequence(parent)
    assert cache.block_ids(child) == cache.block_ids(parent)
    assert cache.allocator.num_used_blocks == 2

    parent_slot, child_slot = cache.append_tokens([parent, child], [1, 1])
    write_tokens(cache, parent_slot, first_value=50.0)
    write_tokens(cache, child_slot, first_value=70.0)
    assert cache.allocator.num_used_blocks == 3  # one private copy of the shared partial block
    assert cache.block_ids(parent)[0] == cache.block_ids(child)[0]
    for seq_id, last_value in ((parent, 50.0), (child, 70.0)):
        for layer_idx in range(NUM_LAYERS):
            keys, _ = cache.gather(layer_idx, seq_id, 0)
            assert torch.equal(keys[:6], prefix)
            assert (keys[6] == last_value).all()


def test_append_counts_copies_exactly_and_changes_nothing_when_short():
    # Three siblings share a partial block: appending to all needs two copies, not three.
    cache = small_cache(num_blocks=3)
    parent = cache.add_sequence()
    cache.append_tokens([parent], [2])
    siblings = [parent, cache.fork_sequence(parent), cache.fork_sequence(parent)]
    cache.append_tokens(siblings, [1, 1, 1])
    assert cache.allocator.num_free_blocks == 0

    before = ([cache.block_ids(s) for s in siblings], [cache.seq_len(s) for s in siblings],
              cache.allocator.num_used_blocks)
    with pytest.raises(OutOfBlocksError):
        cache.append_tokens(siblings, [1, 1, 2])
    after = ([cache.block_ids(s) for s in siblings], [cache.seq_len(s) for s in siblings],
             cache.allocator.num_used_blocks)
    assert after == before


def test_reorder_forks_rows_without_copies_and_frees_dropped_rows():
    cache = small_cache()
    cache.batch = [cache.add_sequence(), cache.add_sequence()]
    old_batch = cache.batch
    cache.append_tokens(old_batch, [5, 3])
    used = cache.allocator.num_used_blocks
    cache.reorder_cache(torch.tensor([0, 0, 0]))
    assert len(set(cache.batch)) == 3 and not set(cache.batch) & set(old_batch)
    assert {tuple(cache.block_ids(s)) for s in cache.batch} == {tuple(cache.block_ids(cache.batch[0]))}
    assert cache.allocator.num_used_blocks == used - 1  # the dropped row's block is free
    assert sorted(cache.sequence_ids) == sorted(cache.batch)


def test_gather_refuses_released_positions():
    cache = small_cache()
    seq_id = cache.add_sequence()
    cache.append_tokens([seq_id], [10])
    cache.release_before(seq_id, 9)
    assert cache.block_ids(seq_id)[:2] == [-1, -1]
    assert cache.gather(0, seq_id, 8)[0].shape == (2, NUM_KV_HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="released"):
        cache.gather(0, seq_id, 7)


def test_batch_must_name_distinct_live_sequences():
    cache = small_cache()
    seq_id = cache.add_sequence()
    with pytest.raises(ValueError):
        cache.batch = [seq_id, seq_id]
    with pytest.raises(ValueError):
        cache.batch = [seq_id + 1]


def test_forward_protocol_rejects_an_interrupted_pass_and_reset_recovers():
    cache = small_cache()
    new_kv = torch.ones(1, NUM_KV_HEADS, 3, HEAD_DIM)
    is_real = torch.ones(1, 3, dtype=torch.bool)
    cache.update(new_kv, new_kv, 0)
    cache.commit_staged(0, is_real, None)  # layer 1 never runs: the pass was interrupted
    assert cache.get_seq_length(0) == 3 and cache.get_seq_length(1) == 0
    cache.update(new_kv, new_kv, 0)
    with pytest.raises(RuntimeError, match="reset"):
        cache.commit_staged(0, is_real, None)

    cache.reset()
    assert cache.allocator.num_used_blocks == 0 and cache.get_seq_length() == 0 and not cache.batch
    cache.update(new_kv, new_kv, 0)
    with pytest.raises(RuntimeError, match="never committed"):
        cache.update(new_kv, new_kv, 1)
