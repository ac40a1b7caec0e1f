"""PagedKVCache: a transformers `Cache` that keeps every layer's K/V in fixed-size blocks.

Each layer owns a key pool and a value pool `[num_blocks, block_size, num_kv_heads, head_dim]`
(fp32, fp16, bf16, or fp8 e4m3 with per-layer scales). One `BlockAllocator` hands out block ids
for all layers at once: a sequence's `BlockTable` says which block holds its token `i` in every
layer, so forking a sequence, copy-on-write and sliding-window release are per sequence, not per
layer.

The class has two faces.

* The sequence level, which the continuous-batching engine builds on: sequences are integer ids;
  `add_sequence`, `fork_sequence`, `free_sequence`; `append_tokens` turns new tokens into cache
  slots (copying shared partial blocks first: copy-on-write); `write` stores one layer's K/V in
  those slots; `block_tables` / `seq_lens` build the kernel arguments; `gather` reads a
  sequence's K/V back for prefill. `batch` is the ordered list of sequences a forward pass runs.
* The Hugging Face level: `update()` receives only `(key, value, layer_idx)`, with no hint of
  which new tokens are padding, so it *stages* the new K/V and returns them unchanged. The
  "paged_attn" attention function (paged_attn/hf.py), which gets the padding mask, claims the
  staged update with `take_staged_cache` and calls `commit_staged`: the first layer of a forward
  pass appends the real tokens to every sequence (`ForwardStep`), each layer then writes its K/V.

Positions: `get_seq_length()` counts forward-pass columns, padding included and equal for every
row, like `DynamicCache`, because that is how Hugging Face sizes its masks and position ids. The
real per-sequence lengths (padding excluded) are `seq_len(seq_id)`. docs_hf.md tells the whole
hand-off.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from paged_attn.allocator import NO_BLOCK, BlockAllocator, BlockTable, OutOfBlocksError
from paged_attn.ops import copy_blocks, write_kv
from paged_attn.pools import empty_pool

FP8 = torch.float8_e4m3fn
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, FP8)

_UNSEEN = object()
"""Sliding window of a layer whose attention has not run yet."""

_staged = threading.local()
"""`_staged.cache`: the PagedKVCache whose update() ran last on this thread and awaits its commit."""


def take_staged_cache(layer_idx: int, key: torch.Tensor) -> PagedKVCache | None:
    """The PagedKVCache whose `update()` returned `key` for this layer, or None.

    None means the attention call is not fed by a PagedKVCache (a DynamicCache, or no cache):
    the attention function then attends over the dense `key`/`value` it was given.
    """
    cache = getattr(_staged, "cache", None)
    if cache is None or not cache._is_staged(layer_idx, key):
        return None
    _staged.cache = None
    return cache


def kv_shape_from_config(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a transformers model config.

    head_dim comes from the config when it sets one (Gemma, Qwen3, ...: not hidden / heads).
    """
    text_config = config.get_text_config(decoder=True)
    num_heads = text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    return text_config.num_hidden_layers, num_kv_heads, head_dim


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype) -> int:
    """Bytes one block id costs across all layers, keys and values."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def _dequantized(cache_entries: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float32 values of cache entries; an fp8 entry stands for `fp8 * scale`."""
    values = cache_entries.float()
    return values * scale if cache_entries.dtype == FP8 else values


class PagedLayer(CacheLayerMixin):
    """One attention layer's block pools, and how many forward positions it has consumed."""

    is_sliding = False  # mask sizes are never windowed; see PagedKVCache.get_mask_sizes
    is_compileable = False

    def __init__(self, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 k_scale: torch.Tensor | None, v_scale: torch.Tensor | None):
        super().__init__()
        self.key_cache = key_cache      # [num_blocks, block_size, num_kv_heads, head_dim]
        self.value_cache = value_cache  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.k_scale = k_scale          # [1] float32 for fp8 pools, else None
        self.v_scale = v_scale          # [1] float32 for fp8 pools, else None
        self.num_positions = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the pools are allocated when the cache is built."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise NotImplementedError("K/V enter a paged cache through PagedKVCache.update()")

    def get_seq_length(self) -> int:
        return self.num_positions

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_positions + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.num_positions = 0


@dataclass
class ForwardStep:
    """What one forward pass appends to its batch; planned once, shared by every layer."""

    seq_ids: list[int]
    is_real: torch.Tensor       # [batch, num_new] bool, False for padding
    start_lens: list[int]       # real tokens of each sequence before this forward pass
    slot_mapping: torch.Tensor  # [batch * num_new] int64, -1 for padding
    block_tables: torch.Tensor  # [batch, max_blocks] int32, after the append, -1 padded
    seq_lens: torch.Tensor      # [batch] int32, after the append
    max_seq_len: int
    start_position: int         # forward positions (padding included) before this pass
    # Per sliding window (None: full), the prefill's rows as paged_attn.hf plans them once.
    prefill_rows: dict = field(default_factory=dict, repr=False)


class PagedKVCache(Cache):
    """Per-layer paged K/V pools with block tables; a drop-in `past_key_values` for generate().

    Use it with `attn_implementation="paged_attn"` (`import paged_attn.hf`, then
    `paged_attn.hf.enable(model)` or `from_pretrained(..., attn_implementation="paged_attn")`).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        k_scale: float = 1.0,
        v_scale: float = 1.0,
        enable_prefix_caching: bool = False,
    ):
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"cache dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
        self.num_kv_heads, self.head_dim, self.block_size = num_kv_heads, head_dim, block_size
        self.dtype, self.device = dtype, torch.device(device)
        pool_shape = (num_blocks, block_size, num_kv_heads, head_dim)

        def scale_tensor(value: float) -> torch.Tensor | None:
            if dtype != FP8:
                return None
            return torch.tensor([value], dtype=torch.float32, device=self.device)

        layers = [
            PagedLayer(empty_pool(pool_shape, dtype, self.device).zero_(),
                       empty_pool(pool_shape, dtype, self.device).zero_(),
                       scale_tensor(k_scale), scale_tensor(v_scale))
            for _ in range(num_layers)
        ]
        super().__init__(layers=layers)
        self.allocator = BlockAllocator(num_blocks, block_size, enable_prefix_caching)
        self.bytes_per_block = bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype)
        self.peak_used_blocks = 0
        self._tables: dict[int, BlockTable] = {}
        self._next_seq_id = 0
        self._batch: list[int] = []
        self._num_positions = 0
        self._step: ForwardStep | None = None
        self._staged_update: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._layer_windows: list = [_UNSEEN] * num_layers

    @classmethod
    def from_model(
        cls,
        model,
        num_blocks: int | None = None,
        *,
        memory_budget_bytes: int | None = None,
        block_size: int = 16,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
        enable_prefix_caching: bool = False,
    ) -> PagedKVCache:
        """A cache shaped for `model`: its layers, KV heads and head dim, on its device.

        Give exactly one of `num_blocks` and `memory_budget_bytes` (the pools then take as many
        whole blocks as fit in the budget). `dtype` defaults to the model's; pass
        `torch.float8_e4m3fn` with `k_scale` / `v_scale` for an fp8 cache.
        """
        if (num_blocks is None) == (memory_budget_bytes is None):
            raise ValueError("pass exactly one of num_blocks and memory_budget_bytes")
        num_layers, num_kv_heads, head_dim = kv_shape_from_config(model.config)
        dtype = dtype or model.dtype
        if memory_budget_bytes is not None:
            num_blocks = memory_budget_bytes // bytes_per_block(
                num_layers, num_kv_heads, head_dim, block_size, dtype)
        return cls(num_layers, num_kv_heads, head_dim, num_blocks, block_size, dtype,
                   device or model.device, k_scale, v_scale, enable_prefix_caching)

    # Memory -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def kv_bytes_in_use(self) -> int:
        """Bytes of the blocks sequences hold now (all layers, keys and values)."""
        return self.allocator.num_used_blocks * self.bytes_per_block

    @property
    def peak_kv_bytes(self) -> int:
        """The most bytes of blocks held at once since the cache was built or reset."""
        return self.peak_used_blocks * self.bytes_per_block

    def _note_usage(self) -> None:
        self.peak_used_blocks = max(self.peak_used_blocks, self.allocator.num_used_blocks)

    # Sequences ----------------------------------------------------------------------------

    def add_sequence(self, prompt_token_ids: list[int] | None = None) -> int:
        """A new sequence; returns its id. Empty, unless prefix caching finds the prompt's start.

        With `enable_prefix_caching` and `prompt_token_ids`, the sequence starts on the cached
        blocks that hold the longest cached prefix of the prompt (`BlockTable.reuse_cached_prefix`);
        `seq_len(seq_id)` then tells how many prompt tokens need no computing.
        """
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        self._tables[seq_id] = BlockTable(self.allocator)
        if prompt_token_ids is not None:
            self._tables[seq_id].reuse_cached_prefix(prompt_token_ids)
            self._note_usage()
        return seq_id

    def key_full_blocks(self, seq_id: int, token_ids: list[int]) -> None:
        """Enter the sequence's newly filled blocks into the prefix cache.

        `token_ids`: the sequence's tokens from its start (see `BlockTable.key_full_blocks`).
        """
        self._table(seq_id).key_full_blocks(token_ids)

    def fork_sequence(self, seq_id: int) -> int:
        """A new sequence sharing every block of `seq_id` (copy-on-write); returns its id."""
        child = self._next_seq_id
        self._next_seq_id += 1
        self._tables[child] = self._table(seq_id).fork()
        return child

    def free_sequence(self, seq_id: int) -> None:
        """Release the sequence's blocks and forget it."""
        self._table(seq_id).free()
        del self._tables[seq_id]

    @property
    def sequence_ids(self) -> list[int]:
        """Every live sequence, in creation order."""
        return list(self._tables)

    @property
    def batch(self) -> list[int]:
        """The sequences of the next forward pass, row by row (empty: generate() makes them)."""
        return list(self._batch)

    @batch.setter
    def batch(self, seq_ids: list[int]) -> None:
        seq_ids = list(seq_ids)
        unknown = [seq_id for seq_id in seq_ids if seq_id not in self._tables]
        if unknown or len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"a batch needs distinct live sequences; unknown: {unknown}")
        self._batch = seq_ids

    def seq_len(self, seq_id: int) -> int:
        """Real tokens the sequence holds (padding is never stored)."""
        return self._table(seq_id).num_tokens

    def block_ids(self, seq_id: int) -> list[int]:
        """The sequence's blocks in logical order; released ones read -1."""
        return self._table(seq_id).block_ids

    def block_tables(self, seq_ids: list[int]) -> torch.Tensor:  # [len(seq_ids), max_blocks] int32
        """Kernel `block_tables`: one row per sequence, padded with -1."""
        tables = [self._table(seq_id) for seq_id in seq_ids]
        width = max((len(table.block_ids) for table in tables), default=0)
        rows = [table.block_table_row(width) for table in tables]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(len(rows), width)

    def seq_lens(self, seq_ids: list[int]) -> torch.Tensor:  # [len(seq_ids)] int32
        """Kernel `seq_lens`: real tokens per sequence."""
        lengths = [self.seq_len(seq_id) for seq_id in seq_ids]
        return torch.tensor(lengths, dtype=torch.int32, device=self.device)

    def append_tokens(self, seq_ids: list[int], num_new_tokens: list[int]) -> list[list[int]]:
        """Room for `num_new_tokens[i]` more tokens in sequence `seq_ids[i]`; returns their slots.

        Shared partial last blocks are copied first, in every layer (copy-on-write). All or
        nothing: raises `OutOfBlocksError`, changing nothing, when the pool is too small.
        """
        needed = self._num_blocks_needed(seq_ids, num_new_tokens)
        if not self.allocator.can_allocate(needed):
            raise OutOfBlocksError(
                f"this step needs {needed} blocks; {self.allocator.num_allocatable_blocks} of "
                f"{self.num_blocks} can be handed out (size the cache with more blocks or a "
                "larger budget)")
        slots, block_copies = [], []
        for seq_id, count in zip(seq_ids, num_new_tokens):
            appended = self._table(seq_id).append(num_tokens=count)
            slots.append(appended.slot_mapping)
            block_copies += appended.block_copies
        if block_copies:
            mapping = torch.tensor(block_copies, dtype=torch.int64, device=self.device)
            copy_blocks([layer.key_cache for layer in self.layers],
                        [layer.value_cache for layer in self.layers], mapping)
        self._note_usage()
        return slots

    def _num_blocks_needed(self, seq_ids: list[int], num_new_tokens: list[int]) -> int:
        """Blocks `append_tokens` will allocate: new blocks plus copy-on-write copies.

        Appending sequences that share a partial last block copy it one by one; the last of
        them writes in place when no sequence outside this append still holds the block.
        """
        needed = 0
        appenders_of_shared_block: dict[int, int] = {}
        for seq_id, count in zip(seq_ids, num_new_tokens):
            table = self._table(seq_id)
            if count == 0:
                continue
            num_blocks = len(table.block_ids)
            needed += -(-(table.num_tokens + count) // self.block_size) - num_blocks
            if table.num_tokens % self.block_size:
                last_block = table.block_ids[-1]
                appenders_of_shared_block[last_block] = appenders_of_shared_block.get(last_block, 0) + 1
        for block_id, appenders in appenders_of_shared_block.items():
            holders = self.allocator.refcount(block_id)
            needed += appenders if holders > appenders else appenders - 1
        return needed

    def write(
        self,
        layer_idx: int,
        key: torch.Tensor,           # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,         # [num_tokens, num_kv_heads, head_dim]
        slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 skips the token
    ) -> None:
        """Store one layer's K/V of new tokens in their slots (fp8 pools quantize)."""
        layer = self.layers[layer_idx]
        write_kv(key, value, layer.key_cache, layer.value_cache, slot_mapping,
                 k_scale=layer.k_scale, v_scale=layer.v_scale)

    def gather(self, layer_idx: int, seq_id: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 keys and values [seq_len - start, num_kv_heads, head_dim] of positions start.."""
        return self.read_slots(layer_idx, self.position_slots(seq_id, start))

    def position_slots(self, seq_id: int, start: int) -> torch.Tensor:  # [seq_len - start] int64
        """Cache slots of the sequence's positions start..; the same in every layer."""
        table = self._table(seq_id)
        positions = torch.arange(start, table.num_tokens, device=self.device)
        block_ids = torch.tensor(table.block_ids, dtype=torch.int64, device=self.device)
        blocks = block_ids[positions // self.block_size]
        if bool((blocks == NO_BLOCK).any()):
            raise ValueError(f"sequence {seq_id} released positions at or after {start}")
        return blocks * self.block_size + positions % self.block_size

    def read_slots(self, layer_idx: int, slots: torch.Tensor,  # [num_slots] int64
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 keys and values [num_slots, num_kv_heads, head_dim] that one layer holds in `slots`."""
        layer = self.layers[layer_idx]
        keys = _dequantized(layer.key_cache.flatten(0, 1)[slots], layer.k_scale)
        values = _dequantized(layer.value_cache.flatten(0, 1)[slots], layer.v_scale)
        return keys, values

    def release_before(self, seq_id: int, position: int) -> None:
        """Free the sequence's blocks that hold only tokens before `position` (sliding window)."""
        self._table(seq_id).release_blocks_before(max(0, position))

    def _table(self, seq_id: int) -> BlockTable:
        table = self._tables.get(seq_id)
        if table is None:
            raise KeyError(f"no live sequence {seq_id}")
        return table

    # Hugging Face Cache API ---------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage one layer's new K/V [batch, num_kv_heads, num_new, head_dim]; return them as is.

        Nothing is written yet: which new tokens are padding is known only to the attention
        function, which commits the staged K/V (`commit_staged`). It therefore receives just
        the new tokens, and reads the older ones from the pages.
        """
        self._check_nothing_staged()
        self._staged_update = (layer_idx, key_states, value_states)
        _staged.cache = self
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Forward positions seen so far, padding included (the same for every row)."""
        self._check_nothing_staged()
        return super().get_seq_length(layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i continues row beam_idx[i] (beam search): forks, no copies."""
        self._reselect_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row becomes `repeats` rows sharing its blocks (parallel sampling)."""
        self._reselect_rows([row for row in range(len(self._batch)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the given rows, in the given order."""
        self._reselect_rows(indices.tolist())

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PagedKVCache cannot drop tokens (assisted decoding needs crop)")

    def reset(self) -> None:
        """Free every sequence; the pools stay allocated."""
        for seq_id in list(self._tables):
            self.free_sequence(seq_id)
        super().reset()
        self._batch = []
        self._num_positions = 0
        self._step = None
        self._staged_update = None
        self._layer_windows = [_UNSEEN] * len(self.layers)
        self.peak_used_blocks = 0

    def restart_positions(self) -> None:
        """Count forward positions from 0 again; every sequence and its tokens stay.

        For a caller that passes its own `position_ids` on every forward pass (the engine): the
        next pass then needs a mask over its own columns only, not over every column ever fed.
        """
        self._check_nothing_staged()
        self._check_between_forward_passes()
        for layer in self.layers:
            layer.reset()
        self._num_positions = 0
        self._step = None

    def _reselect_rows(self, rows: list[int]) -> None:
        self._check_between_forward_passes()
        old_batch = self._batch
        self._batch = [self.fork_sequence(old_batch[row]) for row in rows]
        for seq_id in old_batch:
            self.free_sequence(seq_id)
        self._step = None

    # The forward-pass protocol (used by paged_attn.hf) ------------------------------------

    def _is_staged(self, layer_idx: int, key: torch.Tensor) -> bool:
        staged = self._staged_update
        return staged is not None and staged[0] == layer_idx and staged[1] is key

    def commit_staged(self, layer_idx: int, is_real: torch.Tensor,
                      sliding_window: int | None) -> ForwardStep:
        """Write the K/V staged by `update()` for this layer; returns the forward pass's step.

        `is_real` [batch, num_new] bool marks the new tokens that are not padding; padding gets
        slot -1 and is never stored. The first layer to commit in a forward pass plans the step
        (appends the real tokens to every sequence of the batch); the others join it.
        `sliding_window` (None: full attention) is this layer's window, as the model passed it.
        """
        staged_layer, key, value = self._staged_update
        if staged_layer != layer_idx:
            raise RuntimeError(f"layer {layer_idx} commits the K/V staged by layer {staged_layer}")
        self._staged_update = None
        layer = self.layers[layer_idx]
        batch_size, num_kv_heads, num_new, head_dim = key.shape
        if is_real.shape != (batch_size, num_new):
            raise ValueError(f"padding flags {tuple(is_real.shape)} do not match {num_new} "
                             f"new tokens in {batch_size} rows")
        if layer.num_positions == self._num_positions:
            self._step = self._plan_step(is_real)
        elif (self._step is None or layer.num_positions != self._step.start_position
              or not torch.equal(is_real, self._step.is_real)):
            raise RuntimeError(
                f"layer {layer_idx} is out of step with the cache (a forward pass was interrupted "
                "or layers saw different inputs); call reset()")
        step = self._step
        self.write(layer_idx, key.transpose(1, 2).reshape(-1, num_kv_heads, head_dim),
                   value.transpose(1, 2).reshape(-1, num_kv_heads, head_dim), step.slot_mapping)
        layer.num_positions += num_new
        self._layer_windows[layer_idx] = sliding_window
        return step

    def _plan_step(self, is_real: torch.Tensor) -> ForwardStep:
        """Append this forward pass's real tokens to its batch, once for all layers."""
        self._check_between_forward_passes()
        batch_size, num_new = is_real.shape
        if not self._batch:
            self._batch = [self.add_sequence() for _ in range(batch_size)]
        if len(self._batch) != batch_size:
            raise ValueError(f"the cache runs {len(self._batch)} sequences but the forward pass "
                             f"has {batch_size} rows")
        self._release_outside_window()
        start_lens = [self.seq_len(seq_id) for seq_id in self._batch]
        slots = self.append_tokens(self._batch, is_real.sum(dim=1).tolist())
        slot_mapping = torch.full((batch_size, num_new), -1, dtype=torch.int64, device=self.device)
        slot_mapping[is_real.to(self.device)] = torch.tensor(
            [slot for row in slots for slot in row], dtype=torch.int64, device=self.device)
        lengths = [self.seq_len(seq_id) for seq_id in self._batch]
        step = ForwardStep(
            seq_ids=list(self._batch), is_real=is_real, start_lens=start_lens,
            slot_mapping=slot_mapping.reshape(-1), block_tables=self.block_tables(self._batch),
            seq_lens=torch.tensor(lengths, dtype=torch.int32, device=self.device),
            max_seq_len=max(lengths), start_position=self._num_positions)
        self._num_positions += num_new
        return step

    def _release_outside_window(self) -> None:
        """When every layer slides, free the blocks no upcoming query can see.

        The next query of a sequence of length n sits at position n and attends positions
        n - window + 1 and later. Layers that alternate with full attention keep everything.
        """
        windows = self._layer_windows
        if any(window is _UNSEEN or not window for window in windows):
            return
        widest = max(windows)
        for seq_id in self._batch:
            self.release_before(seq_id, self.seq_len(seq_id) - widest + 1)

    def _check_nothing_staged(self) -> None:
        if self._staged_update is not None:
            raise RuntimeError(
                f"layer {self._staged_update[0]}'s new K/V were never committed: a PagedKVCache "
                "needs attn_implementation='paged_attn' (paged_attn.hf.enable(model)), and the "
                "keys update() returns must reach the attention function unchanged")

    def _check_between_forward_passes(self) -> None:
        if any(layer.num_positions != self._num_positions for layer in self.layers):
            raise RuntimeError("a forward pass did not reach every layer; call reset()")
