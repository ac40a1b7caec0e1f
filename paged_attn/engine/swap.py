"""The CPU swap pool: where preempted sequences' KV blocks wait instead of being recomputed.

The pool mirrors the KV cache's per-layer key and value pools on the CPU (pinned when the cache is
on a GPU) and has its own `BlockAllocator`. Swapping out copies a sequence's live blocks with the
`swap_blocks` op, one call per layer and per keys / values, then frees the sequence in the cache.
Swapping in gives the sequence fresh blocks through `PagedKVCache.append_tokens` and copies the
blocks back. Blocks that sibling sequences share are copied once per sequence, so sharing is lost
across a swap: the scheduler counts the blocks a swap-in needs accordingly.
"""

from __future__ import annotations

import torch

from paged_attn.allocator import NO_BLOCK, BlockAllocator
from paged_attn.engine.request import SwappedSequence
from paged_attn.kv_cache import PagedKVCache
from paged_attn.ops import swap_blocks


class CpuSwapPool:
    """`num_blocks` CPU blocks shaped like the cache's, for every layer."""

    def __init__(self, cache: PagedKVCache, num_blocks: int):
        self.cache = cache
        self.allocator = BlockAllocator(num_blocks, cache.block_size)
        pin = cache.device.type == "cuda"
        self.key_pools, self.value_pools = [], []
        for layer in cache.layers:
            shape = (num_blocks, *layer.key_cache.shape[1:])
            self.key_pools.append(torch.empty(shape, dtype=cache.dtype, pin_memory=pin))
            self.value_pools.append(torch.empty(shape, dtype=cache.dtype, pin_memory=pin))

    def can_hold(self, num_blocks: int) -> bool:
        return self.allocator.can_allocate(num_blocks)

    def swap_out(self, seq_id: int) -> SwappedSequence:
        """Copy the sequence's live blocks here and free it in the cache."""
        gpu_block_ids = self.cache.block_ids(seq_id)
        live = [block_id for block_id in gpu_block_ids if block_id != NO_BLOCK]
        cpu_blocks = iter(self.allocator.allocate(len(live)))
        cpu_block_ids = [NO_BLOCK if block_id == NO_BLOCK else next(cpu_blocks)
                         for block_id in gpu_block_ids]
        self._copy(self.cache_pools(), self.pools(), gpu_block_ids, cpu_block_ids)
        swapped = SwappedSequence(cpu_block_ids, self.cache.seq_len(seq_id))
        self.cache.free_sequence(seq_id)
        return swapped

    def swap_in(self, swapped: SwappedSequence) -> int:
        """Copy the KV back into fresh cache blocks, free the CPU ones; returns the new seq id."""
        seq_id = self.cache.add_sequence()
        self.cache.append_tokens([seq_id], [swapped.num_tokens])
        num_released = swapped.cpu_block_ids.count(NO_BLOCK)
        self.cache.release_before(seq_id, num_released * self.cache.block_size)
        self._copy(self.pools(), self.cache_pools(), swapped.cpu_block_ids,
                   self.cache.block_ids(seq_id))
        for block_id in swapped.cpu_block_ids:
            if block_id != NO_BLOCK:
                self.allocator.free(block_id)
        return seq_id

    def pools(self) -> list[torch.Tensor]:
        """The CPU pools, keys then values per layer: [num_blocks, block_size, heads, head_dim]."""
        return [pool for pair in zip(self.key_pools, self.value_pools) for pool in pair]

    def cache_pools(self) -> list[torch.Tensor]:
        """The cache's pools in the order of `pools()`."""
        return [pool for layer in self.cache.layers
                for pool in (layer.key_cache, layer.value_cache)]

    @staticmethod
    def _copy(sources: list[torch.Tensor], destinations: list[torch.Tensor],
              source_block_ids: list[int], destination_block_ids: list[int]) -> None:
        pairs = [(source, destination)
                 for source, destination in zip(source_block_ids, destination_block_ids,
                                                strict=True)
                 if source != NO_BLOCK]
        if not pairs:
            return
        mapping = torch.tensor(pairs, dtype=torch.int64)
        for source, destination in zip(sources, destinations, strict=True):
            swap_blocks(source, destination, mapping)
