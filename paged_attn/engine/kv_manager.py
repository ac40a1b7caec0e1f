"""Where each sequence's KV lives, and what moving it costs in blocks.

`KVManager`, with its swap pool, is the engine's only writer of the cache's sequences. It starts
them (on their cached prefix when prefix caching is on), forks them for parallel samples and
beams, frees them, preempts whole requests (swap to the CPU pool, or drop the KV to recompute it)
and swaps them back. It also answers the scheduler's questions in blocks; those answers are upper
bounds, so a step that was planned to fit never runs out of blocks halfway through a forward pass.

Prefix caching: after every forward pass the engine calls `register_full_blocks`, which keys each
newly filled block by its tokens, chained over the blocks before it (`BlockTable.
key_full_blocks`). A later sequence whose tokens start the same way picks those blocks up in
`add_sequence` and computes only the rest. Freed keyed blocks stay cached until evicted (LRU).
"""

from __future__ import annotations

from paged_attn.allocator import NO_BLOCK, PrefixCacheStats
from paged_attn.engine.request import Request, RequestState, Sequence
from paged_attn.engine.swap import CpuSwapPool
from paged_attn.kv_cache import PagedKVCache


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


class KVManager:
    """The cache, the optional CPU swap pool, and the residency of every live sequence."""

    def __init__(self, cache: PagedKVCache, swap_pool: CpuSwapPool | None):
        self.cache = cache
        self.swap_pool = swap_pool
        self.block_size = cache.block_size
        # Tokens whose KV recompute preemption dropped; they are prefilled again (less prefix hits).
        self.num_recomputed_tokens = 0

    # Counting blocks ----------------------------------------------------------------------

    @property
    def num_allocatable_blocks(self) -> int:
        """Blocks an allocation can take now: free ones and evictable prefix-cache ones."""
        return self.cache.allocator.num_allocatable_blocks

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.cache.allocator.stats

    def blocks_to_prefill(self, request: Request) -> int:
        """Blocks the prefill of every live sequence may take (prefix-cache hits not counted)."""
        return sum(_ceil_div(len(sequence.token_ids), self.block_size)
                   for sequence in request.sequences)

    def blocks_to_decode(self, request: Request) -> int:
        """Blocks one more token per live sequence may take: a new block or a copy-on-write copy."""
        needed = 0
        for sequence in request.sequences:
            length = self.cache.seq_len(sequence.seq_id)
            if length % self.block_size == 0:
                needed += 1
            elif self.cache.allocator.refcount(self.cache.block_ids(sequence.seq_id)[-1]) > 1:
                needed += 1
        return needed

    def blocks_to_swap_in(self, request: Request) -> int:
        """Blocks the swapped sequences get back, one per block each (sharing is not restored)."""
        return sum(_ceil_div(sequence.swapped.num_tokens, self.block_size)
                   for sequence in request.sequences)

    def peak_blocks(self, num_tokens: int, width: int) -> int:
        """The most blocks a request of `width` sequences growing to `num_tokens` may ask for.

        Each sequence unshared, plus the one block per sequence that the estimates above may
        count for its next token: if a request fits this alone, it always fits alone.
        """
        return width * (_ceil_div(num_tokens, self.block_size) + 1)

    # Sequences ----------------------------------------------------------------------------

    def start_prefill(self, sequence: Sequence) -> int:
        """Put the sequence in the cache, on its cached prefix; returns the tokens that covers."""
        sequence.seq_id = self.cache.add_sequence(prompt_token_ids=sequence.token_ids)
        return self.cache.seq_len(sequence.seq_id)

    def fork(self, sequence: Sequence) -> Sequence:
        """A sibling sharing every block of `sequence` (copy-on-write on its next token)."""
        return sequence.branch(self.cache.fork_sequence(sequence.seq_id))

    def free(self, sequence: Sequence) -> None:
        """Release the sequence's KV (cache blocks or CPU blocks), wherever it lives."""
        if sequence.seq_id is not None:
            self.cache.free_sequence(sequence.seq_id)
            sequence.seq_id = None
        if sequence.swapped is not None:
            for block_id in sequence.swapped.cpu_block_ids:
                if block_id != NO_BLOCK:
                    self.swap_pool.allocator.free(block_id)
            sequence.swapped = None

    def register_full_blocks(self, sequences: list[Sequence]) -> None:
        """Key the sequences' newly filled blocks in the prefix cache (no-op when it is off)."""
        for sequence in sequences:
            self.cache.key_full_blocks(sequence.seq_id, sequence.token_ids)

    # Preemption ---------------------------------------------------------------------------

    def preempt(self, request: Request) -> RequestState:
        """Move a running request out of the cache; returns its new state.

        Swaps to the CPU pool when there is one and it has room, else frees the KV: the request
        then waits for a prefill over all its tokens (the prefix cache may still hold some).
        """
        needed = sum(sum(block_id != NO_BLOCK for block_id in self.cache.block_ids(sequence.seq_id))
                     for sequence in request.sequences)
        if self.swap_pool is not None and self.swap_pool.can_hold(needed):
            for sequence in request.sequences:
                sequence.swapped = self.swap_pool.swap_out(sequence.seq_id)
                sequence.seq_id = None
            return RequestState.SWAPPED
        for sequence in request.sequences:
            self.num_recomputed_tokens += self.cache.seq_len(sequence.seq_id)
            self.free(sequence)
        return RequestState.WAITING

    def swap_in(self, request: Request) -> None:
        """Bring a swapped request's sequences back into the cache."""
        for sequence in request.sequences:
            sequence.seq_id = self.swap_pool.swap_in(sequence.swapped)
            sequence.swapped = None
