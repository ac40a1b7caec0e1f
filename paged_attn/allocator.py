"""Block bookkeeping for a paged KV cache: which physical block holds which tokens.

Pure Python: this module imports neither torch nor transformers, so the engine
can plan a step before any kernel runs and the tests run anywhere.

Two classes do the work:

* `BlockAllocator` owns a fixed pool of `num_blocks` blocks of `block_size`
  token slots each. Blocks are reference counted, so sequences can share them
  (fork, beam search, prefix caching). With prefix caching on, every full block
  is also keyed by a hash of its tokens chained over all the blocks before it,
  and a freed block keeps its key until the pool needs the memory back.
* `BlockTable` is one sequence's view: the list of its blocks in logical order.
  It turns appended tokens into cache slots (`slot = block_id * block_size +
  offset`), the `slot_mapping` that `write_kv` consumes, and tells the caller
  which blocks to duplicate with `copy_blocks` before writing (copy-on-write).

Every count is exact at all times: `num_free_blocks + num_used_blocks +
num_cached_blocks == num_blocks`. An operation that runs out of blocks raises
`OutOfBlocksError` before it changes anything.
"""

from __future__ import annotations

import copy
import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

NO_BLOCK = -1
"""Block id of an entry that holds no block: padding in a `block_tables` row,
or a block a sliding-window sequence has already released."""

_HASH_BYTES = 16


class OutOfBlocksError(RuntimeError):
    """Raised when an operation needs more blocks than the pool can hand out.

    The operation that raises it has changed nothing: the allocator's counts,
    reference counts, prefix cache and every block table are exactly as they
    were before the call. The engine can therefore catch it and preempt a
    sequence (swap it out or drop it for recomputation) and simply retry.
    """


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Key of a full block: SHA-256 over the previous block's key and this block's tokens.

    Chaining makes the key depend on the whole prefix, so two blocks with the
    same tokens after different prefixes never share a key. A cryptographic hash
    keeps adversarial prompts from forging a collision; the allocator still
    compares the stored tokens on every hit as a second guard.
    """
    digest = hashlib.sha256((parent_hash or 0).to_bytes(_HASH_BYTES, "little"))
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest()[:_HASH_BYTES], "little")


@dataclass
class PrefixCacheStats:
    """Prefix-cache counters, in blocks.

    A prompt lookup queries each of its full blocks in order until the first
    miss; every queried block is a hit or a miss. An eviction is a cached,
    unreferenced block whose key was dropped so the block could be reused.
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        """Hits over queried blocks; 0.0 before any query."""
        queried = self.hits + self.misses
        return self.hits / queried if queried else 0.0


class _CacheEntry(NamedTuple):
    """What the prefix cache remembers about a full block, enough to verify a hit."""

    block_hash: int
    parent_hash: int | None
    token_ids: tuple[int, ...]


class BlockAllocator:
    """A fixed pool of reference-counted KV-cache blocks, with an optional prefix cache.

    A block is in exactly one of three states:

    * used: its reference count is above zero;
    * cached: unreferenced but still keyed in the prefix cache, so a later
      prompt with the same prefix can take it back without recomputing it;
    * free: unreferenced and holding nothing of value.

    Unreferenced blocks (free and cached) wait in one queue. Free blocks sit at
    its head; cached blocks follow in the order they were released, so the
    queue doubles as the LRU list of the prefix cache: allocation takes a free
    block while there is one and otherwise evicts the least recently released
    cached block. Every per-block operation is O(1).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._unreferenced: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._num_cached = 0
        self._block_by_hash: dict[int, int] = {}
        self._entry_by_block: dict[int, _CacheEntry] = {}
        self._stats = PrefixCacheStats()

    # Counts -------------------------------------------------------------

    @property
    def num_used_blocks(self) -> int:
        """Blocks with a reference count above zero."""
        return self.num_blocks - len(self._unreferenced)

    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks that still hold a prefix-cache entry (evictable)."""
        return self._num_cached

    @property
    def num_free_blocks(self) -> int:
        """Unreferenced blocks with no cache entry."""
        return len(self._unreferenced) - self._num_cached

    @property
    def num_allocatable_blocks(self) -> int:
        """Blocks `allocate` can hand out now: free ones and evictable cached ones."""
        return len(self._unreferenced)

    @property
    def stats(self) -> PrefixCacheStats:
        """A snapshot of the prefix-cache counters."""
        return replace(self._stats)

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether `allocate(num_blocks)` would succeed; evictable cached blocks count."""
        return num_blocks <= self.num_allocatable_blocks

    def refcount(self, block_id: int) -> int:
        """How many owners hold `block_id`."""
        self._check_block_id(block_id)
        return self._ref_counts[block_id]

    # Allocation and reference counting -----------------------------------

    def allocate(self, num_blocks: int = 1) -> list[int]:
        """Hand out `num_blocks` blocks, each with reference count 1.

        Takes free blocks first, then evicts cached blocks, least recently
        released first. Raises `OutOfBlocksError` (changing nothing) when fewer
        than `num_blocks` are unreferenced.
        """
        if num_blocks < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num_blocks})")
        if not self.can_allocate(num_blocks):
            raise OutOfBlocksError(
                f"need {num_blocks} blocks but only {self.num_allocatable_blocks} of "
                f"{self.num_blocks} can be handed out"
            )
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._unreferenced.popitem(last=False)
            if block_id in self._entry_by_block:
                self._evict(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def fork(self, block_id: int) -> int:
        """Take one more reference on a used block, for another owner that shares it; returns it."""
        self._check_in_use(block_id, "fork")
        self._ref_counts[block_id] += 1
        return block_id

    def free(self, block_id: int) -> None:
        """Drop one reference; the last one returns the block to the pool.

        A block with a prefix-cache entry becomes cached (most recently released
        at the tail of the LRU order); any other block becomes free. Raises
        ValueError for an id out of range or a block nobody holds.
        """
        self._check_in_use(block_id, "free")
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id]:
            return
        self._unreferenced[block_id] = None
        if block_id in self._entry_by_block:
            self._num_cached += 1
        else:
            self._unreferenced.move_to_end(block_id, last=False)

    # Prefix cache ---------------------------------------------------------

    def cache_full_block(
        self, block_id: int, parent_hash: int | None, token_ids: Sequence[int]
    ) -> int:
        """Key a full, used block by its tokens and its parent's key; returns the key.

        `parent_hash` is the key of the previous block of the same sequence
        (None for the first block). When another block already holds the same
        key, that block stays the cached one and `block_id` is left uncached.
        """
        self._check_in_use(block_id, "cache")
        if len(token_ids) != self.block_size:
            raise ValueError(
                f"only full blocks are cached: got {len(token_ids)} tokens, "
                f"block_size is {self.block_size}"
            )
        block_hash = hash_block_tokens(parent_hash, token_ids)
        if not self.enable_prefix_caching:
            return block_hash
        if block_hash not in self._block_by_hash and block_id not in self._entry_by_block:
            self._block_by_hash[block_hash] = block_id
            self._entry_by_block[block_id] = _CacheEntry(block_hash, parent_hash, tuple(token_ids))
        return block_hash

    def acquire_cached_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Take a reference on the cached blocks holding the longest prefix of `token_ids`.

        Only whole blocks are looked up; a trailing partial block is ignored.
        Returns the block ids and their keys, in order. Each queried block
        counts as a hit or a miss; the walk stops at the first miss.
        """
        block_ids: list[int] = []
        block_hashes: list[int] = []
        if not self.enable_prefix_caching:
            return block_ids, block_hashes
        num_queried = len(token_ids) // self.block_size
        parent_hash = None
        for start in range(0, num_queried * self.block_size, self.block_size):
            block_tokens = tuple(token_ids[start : start + self.block_size])
            block_hash = hash_block_tokens(parent_hash, block_tokens)
            block_id = self._find_cached(_CacheEntry(block_hash, parent_hash, block_tokens))
            if block_id is None:
                break
            self._take_reference(block_id)
            block_ids.append(block_id)
            block_hashes.append(block_hash)
            parent_hash = block_hash
        self._stats.hits += len(block_ids)
        self._stats.misses += num_queried - len(block_ids)
        return block_ids, block_hashes

    def _find_cached(self, wanted: _CacheEntry) -> int | None:
        """The block keyed by `wanted.block_hash`, if its stored tokens and parent match too."""
        block_id = self._block_by_hash.get(wanted.block_hash)
        if block_id is None or self._entry_by_block[block_id] != wanted:
            return None
        return block_id

    def _take_reference(self, block_id: int) -> None:
        if self._ref_counts[block_id] == 0:
            del self._unreferenced[block_id]
            self._num_cached -= 1
        self._ref_counts[block_id] += 1

    def _evict(self, block_id: int) -> None:
        entry = self._entry_by_block.pop(block_id)
        del self._block_by_hash[entry.block_hash]
        self._num_cached -= 1
        self._stats.evictions += 1

    # Checks -------------------------------------------------------------

    def _check_block_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is out of range [0, {self.num_blocks})")

    def _check_in_use(self, block_id: int, action: str) -> None:
        self._check_block_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"cannot {action} block {block_id}: its reference count is already 0")


class AppendResult(NamedTuple):
    """What `BlockTable.append` asks of the caller, in this order.

    First copy each `(src_block, dst_block)` pair of `block_copies` (the
    `copy_blocks` op), then write the new tokens' K/V to `slot_mapping` (the
    `write_kv` op), one slot per new token.
    """

    slot_mapping: list[int]
    block_copies: list[tuple[int, int]]


class BlockTable:
    """The blocks of one sequence, in logical order, and the slots of its tokens.

    Token `i` of the sequence lives in block `block_ids[i // block_size]` at
    offset `i % block_size`. A table holds one reference on each of its blocks.

    A typical life: `reuse_cached_prefix(prompt)` to pick up cached blocks,
    `append(token_ids=...)` for the rest of the prompt and then for each
    generated token, `fork()` for parallel samples, `free()` at the end.
    """

    def __init__(self, allocator: BlockAllocator):
        self._allocator = allocator
        self._clear()

    def _clear(self) -> None:
        self._block_ids: list[int] = []
        self._num_tokens = 0
        self._num_released = 0
        # The prefix-cache key of each full block, for as long as every token so
        # far arrived with its id, and the ids of the partial last block.
        self._block_hashes: list[int] = []
        self._partial_block_token_ids: list[int] = []
        self._hashing = self._allocator.enable_prefix_caching

    # Views --------------------------------------------------------------

    @property
    def allocator(self) -> BlockAllocator:
        """The allocator whose blocks this table holds (changes on swap)."""
        return self._allocator

    @property
    def block_size(self) -> int:
        return self._allocator.block_size

    @property
    def num_tokens(self) -> int:
        """Tokens appended so far, including any released by `release_blocks_before`."""
        return self._num_tokens

    @property
    def block_ids(self) -> list[int]:
        """A copy of the block ids in logical order; released blocks read `NO_BLOCK`."""
        return list(self._block_ids)

    def block_table_row(self, width: int) -> list[int]:
        """This sequence's row of a `block_tables` tensor: block ids padded with `NO_BLOCK`."""
        if width < len(self._block_ids):
            raise ValueError(f"a row of width {width} cannot hold {len(self._block_ids)} blocks")
        return self._block_ids + [NO_BLOCK] * (width - len(self._block_ids))

    # Growing --------------------------------------------------------------

    def append(
        self, num_tokens: int | None = None, token_ids: Sequence[int] | None = None
    ) -> AppendResult:
        """Make room for new tokens; returns their slots and the copies to do first.

        Pass either `num_tokens` or `token_ids`. With token ids, each block that
        becomes full is entered into the prefix cache (when the allocator has
        it on); a single count-only append ends that for this sequence.

        If the last block is partly filled and shared with another sequence,
        this sequence first moves to a private copy of it: the pair
        `(shared_block, private_block)` is returned in `block_copies`, and the
        other owner's block is left untouched. Raises `OutOfBlocksError`, with
        nothing changed, when the new blocks and copy cannot be allocated.
        """
        if (num_tokens is None) == (token_ids is None):
            raise ValueError("pass exactly one of num_tokens and token_ids")
        if token_ids is not None:
            token_ids = list(token_ids)
            num_tokens = len(token_ids)
        if num_tokens < 0:
            raise ValueError(f"cannot append a negative number of tokens ({num_tokens})")
        if num_tokens == 0:
            return AppendResult([], [])

        block_size = self.block_size
        needs_private_copy = (
            self._num_tokens % block_size != 0 and self._allocator.refcount(self._block_ids[-1]) > 1
        )
        num_new_blocks = -(-(self._num_tokens + num_tokens) // block_size) - len(self._block_ids)
        new_blocks = self._allocator.allocate(num_new_blocks + needs_private_copy)

        block_copies = []
        if needs_private_copy:
            shared_block, private_block = self._block_ids[-1], new_blocks.pop()
            self._allocator.free(shared_block)
            self._block_ids[-1] = private_block
            block_copies.append((shared_block, private_block))
        self._block_ids.extend(new_blocks)

        slot_mapping = self._slots(self._num_tokens, self._num_tokens + num_tokens)
        self._num_tokens += num_tokens
        self._record_token_ids(token_ids)
        return AppendResult(slot_mapping, block_copies)

    def _slots(self, start: int, end: int) -> list[int]:
        """Slots of positions [start, end): one run of consecutive slots per block."""
        block_size = self.block_size
        slots: list[int] = []
        position = start
        while position < end:
            block_index, offset = divmod(position, block_size)
            run = min(block_size - offset, end - position)
            first_slot = self._block_ids[block_index] * block_size + offset
            slots.extend(range(first_slot, first_slot + run))
            position += run
        return slots

    def _record_token_ids(self, token_ids: list[int] | None) -> None:
        """Key every block these tokens fill, while the chain of keys is unbroken."""
        if not self._hashing:
            return
        if token_ids is None:
            self._hashing = False
            self._partial_block_token_ids = []
            return
        pending = self._partial_block_token_ids
        pending.extend(token_ids)
        block_size = self.block_size
        while len(pending) >= block_size:
            self._key_next_block(pending[:block_size])
            del pending[:block_size]

    def key_full_blocks(self, token_ids: Sequence[int]) -> None:
        """Enter each full block not keyed yet into the prefix cache (no-op when it is off).

        For tables grown with counts only: a serving engine appends a step's
        tokens before it knows them (they are sampled from that step). Pass the
        sequence's tokens from its start, at least `num_tokens` of them, after
        they are written. A block already released by `release_blocks_before`
        is not entered, but its key still extends the chain to later blocks.
        """
        if not self._allocator.enable_prefix_caching:
            return
        if len(token_ids) < self._num_tokens:
            raise ValueError(f"{len(token_ids)} token ids given for {self._num_tokens} tokens")
        block_size = self.block_size
        for block_index in range(len(self._block_hashes), self._num_tokens // block_size):
            self._key_next_block(token_ids[block_index * block_size:(block_index + 1) * block_size])

    def _key_next_block(self, token_ids: Sequence[int]) -> None:
        """Key the first block without a key, which holds `token_ids`, chained on the one before."""
        block_index = len(self._block_hashes)
        parent_hash = self._block_hashes[-1] if self._block_hashes else None
        block_id = self._block_ids[block_index]
        if block_id == NO_BLOCK:
            self._block_hashes.append(hash_block_tokens(parent_hash, token_ids))
        else:
            self._block_hashes.append(
                self._allocator.cache_full_block(block_id, parent_hash, token_ids)
            )

    def reuse_cached_prefix(self, prompt_token_ids: Sequence[int]) -> int:
        """Start an empty table on the cached blocks that hold the prompt's longest prefix.

        Returns how many leading prompt tokens are already in the cache; the
        caller computes the rest and appends them with
        `append(token_ids=prompt_token_ids[returned:])`. At least the last
        prompt token is always left to compute, because the engine needs its
        logits. Returns 0 when the allocator has prefix caching off.
        """
        if self._num_tokens:
            raise ValueError("only an empty block table can start on a cached prefix")
        block_size = self.block_size
        reusable = (len(prompt_token_ids) - 1) // block_size * block_size
        block_ids, block_hashes = self._allocator.acquire_cached_prefix(
            prompt_token_ids[: max(reusable, 0)]
        )
        self._block_ids = block_ids
        self._block_hashes = block_hashes
        self._num_tokens = len(block_ids) * block_size
        return self._num_tokens

    # Sharing and releasing ----------------------------------------------

    def fork(self) -> BlockTable:
        """A new table for a sibling sequence that shares every block of this one.

        Both tables hold a reference on each block; whichever appends into the
        shared partial last block first gets a private copy (see `append`).
        """
        for block_id in self._live_block_ids():
            self._allocator.fork(block_id)
        child = copy.copy(self)
        child._block_ids = list(self._block_ids)
        child._block_hashes = list(self._block_hashes)
        child._partial_block_token_ids = list(self._partial_block_token_ids)
        return child

    def free(self) -> None:
        """Release every block; the table is empty afterwards and can be reused."""
        for block_id in self._live_block_ids():
            self._allocator.free(block_id)
        self._clear()

    def release_blocks_before(self, position: int) -> None:
        """Release the blocks whose tokens all lie before `position` (sliding window).

        Their entries read `NO_BLOCK` from then on, so the positions of the
        remaining tokens do not move. With a window of `w` tokens, call it with
        `num_tokens - w` (or whatever bound the model's window defines).
        """
        if not 0 <= position <= self._num_tokens:
            raise ValueError(f"position {position} is outside [0, {self._num_tokens}]")
        end = position // self.block_size
        for block_index in range(self._num_released, end):
            self._allocator.free(self._block_ids[block_index])
            self._block_ids[block_index] = NO_BLOCK
        self._num_released = max(self._num_released, end)

    def _live_block_ids(self) -> list[int]:
        return self._block_ids[self._num_released :]

    # Swapping -------------------------------------------------------------

    def swap_out(self, cpu_allocator: BlockAllocator) -> list[tuple[int, int]]:
        """Move this table's blocks to `cpu_allocator`; returns the (gpu, cpu) block pairs.

        The caller copies each pair with `swap_blocks` before reusing the GPU
        blocks. Raises `OutOfBlocksError`, changing nothing, when the CPU pool is
        too small. Blocks shared with other tables get their own copy here.
        """
        return self._move_to(cpu_allocator)

    def swap_in(self, gpu_allocator: BlockAllocator) -> list[tuple[int, int]]:
        """Move this table's blocks back to `gpu_allocator`; returns the (cpu, gpu) block pairs."""
        return self._move_to(gpu_allocator)

    def _move_to(self, destination: BlockAllocator) -> list[tuple[int, int]]:
        if destination is self._allocator:
            raise ValueError("the table's blocks are already in this allocator")
        if destination.block_size != self.block_size:
            raise ValueError(
                f"block sizes differ: {self.block_size} here, {destination.block_size} there"
            )
        live = self._live_block_ids()
        moved = destination.allocate(len(live))
        for source_block in live:
            self._allocator.free(source_block)
        self._block_ids[self._num_released :] = moved
        self._allocator = destination
        return list(zip(live, moved, strict=True))
