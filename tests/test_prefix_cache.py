"""Tests of prefix caching in the block allocator and block tables (paged_attn/allocator.py).

Full blocks are keyed by a hash of their tokens chained over the blocks before them; a later
table reuses the longest cached prefix, freed keyed blocks stay cached until evicted (LRU),
and count-only tables are keyed through `BlockTable.key_full_blocks`.
"""

import pytest

from paged_attn import allocator as allocator_module
from paged_attn.allocator import BlockAllocator, BlockTable, hash_block_tokens
from tables import filled_table


def test_prefix_hit_reuses_cached_blocks_and_counts_hits_and_misses():
    allocator = BlockAllocator(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = filled_table(allocator, range(10))
    second = BlockTable(allocator)
    assert second.reuse_cached_prefix([0, 1, 2, 3, 4, 5, 6, 7, 99, 98]) == 8
    assert second.block_ids == first.block_ids[:2]
    assert allocator.refcount(first.block_ids[0]) == 2
    assert allocator.stats.hits == 2 and allocator.stats.misses == 0

    third = BlockTable(allocator)
    assert third.reuse_cached_prefix([0, 1, 2, 3, 9, 9, 9, 9, 9]) == 4
    assert allocator.stats.hits == 3 and allocator.stats.misses == 1
    assert allocator.stats.hit_rate == pytest.approx(0.75)


def test_prefix_reuse_leaves_the_last_prompt_token_to_compute():
    allocator = BlockAllocator(num_blocks=8, block_size=4, enable_prefix_caching=True)
    filled_table(allocator, range(8))
    table = BlockTable(allocator)
    assert table.reuse_cached_prefix(list(range(8))) == 4
    slots, _ = table.append(token_ids=range(4, 8))
    assert len(slots) == 4 and table.num_tokens == 8
    assert BlockTable(allocator).reuse_cached_prefix([0]) == 0


def test_prefix_reuse_only_on_an_empty_table():
    allocator = BlockAllocator(num_blocks=8, block_size=4, enable_prefix_caching=True)
    table = filled_table(allocator, [1])
    with pytest.raises(ValueError, match="empty"):
        table.reuse_cached_prefix([1, 2, 3, 4, 5])


def test_tokens_appended_in_pieces_are_cached_per_full_block():
    allocator = BlockAllocator(num_blocks=8, block_size=2, enable_prefix_caching=True)
    prompt = [5, 6, 7, 8, 9]
    table = BlockTable(allocator)
    table.append(token_ids=prompt[:3])
    table.append(token_ids=prompt[3:])
    table.free()
    same_prefix_later = BlockTable(allocator)
    assert same_prefix_later.reuse_cached_prefix(prompt + [1]) == 4
    other_first_block = BlockTable(allocator)
    assert other_first_block.reuse_cached_prefix([0, 0, 7, 8, 9]) == 0


def test_freed_cached_blocks_stay_reusable_until_evicted_least_recent_first():
    allocator = BlockAllocator(num_blocks=4, block_size=2, enable_prefix_caching=True)
    older = filled_table(allocator, [1, 1])
    newer = filled_table(allocator, [2, 2])
    older.free()
    newer.free()
    assert (allocator.num_cached_blocks, allocator.num_free_blocks) == (2, 2)

    allocator.allocate(2)
    assert allocator.num_cached_blocks == 2, "plain free blocks go first"
    allocator.allocate(1)
    assert allocator.stats.evictions == 1
    assert BlockTable(allocator).reuse_cached_prefix([1, 1, 0]) == 0
    assert BlockTable(allocator).reuse_cached_prefix([2, 2, 0]) == 2
    assert allocator.num_cached_blocks == 0 and allocator.num_used_blocks == 4


def test_a_block_freed_without_cache_entry_is_reused_before_any_eviction():
    allocator = BlockAllocator(num_blocks=2, block_size=2, enable_prefix_caching=True)
    cached = filled_table(allocator, [1, 1])
    scratch = filled_table(allocator, [5])
    scratch_block = scratch.block_ids[0]
    cached.free()
    scratch.free()
    assert allocator.allocate(1) == [scratch_block]
    assert allocator.stats.evictions == 0 and allocator.num_cached_blocks == 1


def test_a_cache_hit_on_an_unreferenced_block_makes_it_used_again():
    allocator = BlockAllocator(num_blocks=3, block_size=2, enable_prefix_caching=True)
    filled_table(allocator, [4, 4]).free()
    table = BlockTable(allocator)
    assert table.reuse_cached_prefix([4, 4, 0]) == 2
    assert (allocator.num_used_blocks, allocator.num_cached_blocks) == (1, 0)
    table.free()
    assert allocator.num_cached_blocks == 1


def test_collision_guard_compares_tokens_on_a_hash_hit(monkeypatch):
    monkeypatch.setattr(allocator_module, "hash_block_tokens", lambda parent, tokens: 42)
    allocator = BlockAllocator(num_blocks=8, block_size=2, enable_prefix_caching=True)
    cached = filled_table(allocator, [1, 2])
    impostor = BlockTable(allocator)
    assert impostor.reuse_cached_prefix([3, 4, 5]) == 0
    assert allocator.stats.misses == 1
    genuine = BlockTable(allocator)
    assert genuine.reuse_cached_prefix([1, 2, 5]) == 2
    assert genuine.block_ids == cached.block_ids


def test_hash_depends_on_the_parent_and_the_tokens():
    root = hash_block_tokens(None, [1, 2])
    assert root == hash_block_tokens(None, [1, 2])
    assert root != hash_block_tokens(None, [2, 1])
    assert hash_block_tokens(root, [3, 4]) != hash_block_tokens(None, [3, 4])


def test_count_only_append_stops_caching_for_that_sequence():
    allocator = BlockAllocator(num_blocks=8, block_size=2, enable_prefix_caching=True)
    table = filled_table(allocator, [1, 2])
    table.append(num_tokens=1)
    table.append(token_ids=[4])
    table.free()
    assert allocator.num_cached_blocks == 1
    assert BlockTable(allocator).reuse_cached_prefix([1, 2, 3, 4, 5]) == 2


def test_key_full_blocks_caches_a_count_only_table_like_a_token_append():
    allocator = BlockAllocator(num_blocks=8, block_size=2, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4, 5]
    table = BlockTable(allocator)
    table.append(num_tokens=3)
    table.key_full_blocks(tokens)
    table.append(num_tokens=2)
    table.key_full_blocks(tokens)
    assert allocator.num_cached_blocks == 0, "blocks in use are not counted as cached"
    table.free()
    assert allocator.num_cached_blocks == 2, "the partial last block is never keyed"
    assert BlockTable(allocator).reuse_cached_prefix(tokens + [6]) == 4
    assert BlockTable(allocator).reuse_cached_prefix([1, 2, 9, 9, 9]) == 2


def test_key_full_blocks_wants_every_token_and_is_off_without_prefix_caching():
    caching = BlockAllocator(num_blocks=4, block_size=2, enable_prefix_caching=True)
    table = BlockTable(caching)
    table.append(num_tokens=4)
    with pytest.raises(ValueError, match="3 token ids given for 4 tokens"):
        table.key_full_blocks([1, 2, 3])

    plain = BlockAllocator(num_blocks=4, block_size=2)
    table = BlockTable(plain)
    table.append(num_tokens=4)
    table.key_full_blocks([1, 2, 3, 4])
    table.free()
    assert plain.num_cached_blocks == 0


def test_key_full_blocks_chains_over_a_released_block():
    allocator = BlockAllocator(num_blocks=8, block_size=2, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4, 5, 6]
    table = BlockTable(allocator)
    table.append(num_tokens=6)
    first_block, *later_blocks = table.block_ids
    table.release_blocks_before(2)
    table.key_full_blocks(tokens)
    assert allocator.refcount(first_block) == 0
    table.free()
    assert allocator.num_cached_blocks == 2, "the released block is not entered"
    assert BlockTable(allocator).reuse_cached_prefix(tokens + [7]) == 0, "its prefix is gone"
    # Once the first block is cached again, the later ones are found under their chained keys.
    filled_table(allocator, tokens[:2])
    reused = BlockTable(allocator)
    assert reused.reuse_cached_prefix(tokens + [7]) == 6
    assert reused.block_ids[1:] == later_blocks


def test_prefix_caching_off_caches_nothing():
    allocator = BlockAllocator(num_blocks=8, block_size=2)
    filled_table(allocator, [1, 2, 3, 4]).free()
    assert allocator.num_cached_blocks == 0
    assert BlockTable(allocator).reuse_cached_prefix([1, 2, 3, 4, 5]) == 0
    assert allocator.stats.hits == allocator.stats.misses == 0
    assert allocator.stats.hit_rate == 0.0
