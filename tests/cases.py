"""Shared test inputs: pairwise parameter grids, paged-cache builders and the tolerance rule.

Every backend's tests (CPU kernels, CUDA kernels through the emulator, real GPU) build their
inputs here so that they all face the same awkward cases:
  * physical blocks shuffled and shared out of order, with spare blocks nobody uses;
  * every cache slot that no sequence uses, and every output, filled with NaN, so a stray read
    or an unwritten output cannot pass;
  * cache layouts whose strides differ from the dense NHD layout.

Tolerance (DESIGN.md section 6): float32 results must be within 1e-5 (relative to the output's
magnitude) of the float64 reference. float16 / bfloat16 results may be off by at most twice the
error PyTorch itself makes computing the same attention in that dtype, plus a small atol.
"""

import itertools
import random
from dataclasses import dataclass, field

import torch

from paged_attn import reference

FP8 = torch.float8_e4m3fn
LAYOUTS = ("nhd", "hnd", "interleaved_kv", "padded_heads")
LOW_PRECISION_ATOL = {torch.float16: 1e-3, torch.bfloat16: 4e-3}


def pairwise(parameters: dict[str, list], seed: int = 0) -> list[dict]:
    """A small list of combinations that covers every pair of values of any two parameters.

    Greedy construction: each new row picks, parameter by parameter, the value that covers the
    most still-uncovered pairs with the values already chosen for that row.
    """
    names = list(parameters)
    rng = random.Random(seed)
    uncovered = {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(names, 2)
        for va in range(len(parameters[a]))
        for vb in range(len(parameters[b]))
    }
    rows = []
    while uncovered:
        row: dict[str, int] = {}
        # Seed the row with one uncovered pair so every row makes progress.
        (first, first_value), (second, second_value) = min(uncovered)
        row[first], row[second] = first_value, second_value
        for name in names:
            if name in row:
                continue
            candidates = list(range(len(parameters[name])))
            rng.shuffle(candidates)
            row[name] = max(candidates, key=lambda value: sum(
                ((other, row[other]), (name, value)) in uncovered
                or ((name, value), (other, row[other])) in uncovered
                for other in row))
        for a, b in itertools.combinations(names, 2):
            uncovered.discard(((a, row[a]), (b, row[b])))
        rows.append({name: parameters[name][row[name]] for name in names})
    return rows


def case_id(params: dict) -> str:
    """A short pytest id for a parameter dict."""
    def short(value):
        if isinstance(value, torch.dtype):
            return str(value).replace("torch.", "")
        if isinstance(value, (list, tuple)):
            return "x".join(map(str, value)) if len(value) <= 4 else f"{len(value)}seqs"
        return str(value)

    return "-".join(f"{key}={short(value)}" for key, value in params.items())


def empty_cache_pair(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                     dtype: torch.dtype, layout: str = "nhd",
                     device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value caches [num_blocks, block_size, num_kv_heads, head_size], NaN everywhere.

    layout picks the strides:
      nhd             dense, the canonical layout
      hnd             a permuted view of [num_blocks, num_kv_heads, block_size, head_size]
      interleaved_kv  slices of one [num_blocks, 2, block_size, num_kv_heads, head_size] tensor
      padded_heads    head_size is a slice of a wider (16 extra elements) last dimension
    """
    def nan_filled(*shape):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device).to(dtype)

    if layout == "nhd":
        return (nan_filled(num_blocks, block_size, num_kv_heads, head_size),
                nan_filled(num_blocks, block_size, num_kv_heads, head_size))
    if layout == "hnd":
        return tuple(nan_filled(num_blocks, num_kv_heads, block_size, head_size).permute(0, 2, 1, 3)
                     for _ in range(2))
    if layout == "interleaved_kv":
        both = nan_filled(num_blocks, 2, block_size, num_kv_heads, head_size)
        return both[:, 0], both[:, 1]
    if layout == "padded_heads":
        return tuple(nan_filled(num_blocks, block_size, num_kv_heads, head_size + 16)[..., :head_size]
                     for _ in range(2))
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def fp8_scale_for(values: torch.Tensor) -> torch.Tensor:
    """A per-tensor scale [1] float32 that maps the values' range onto fp8 e4m3's (max 448)."""
    return (values.abs().max().float() / 200.0).clamp(min=1e-6).reshape(1)


@dataclass
class DecodeCase:
    """All inputs of one paged_attention call, with NaN wherever no sequence has data."""

    query: torch.Tensor         # [num_seqs, num_heads, head_size]
    key_cache: torch.Tensor     # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor   # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, -1 where no block is mapped
    seq_lens: torch.Tensor      # [num_seqs] int32
    scale: float
    alibi_slopes: torch.Tensor | None = None  # [num_heads] float32
    sliding_window: int = 0
    logits_soft_cap: float = 0.0
    k_scale: torch.Tensor | None = None       # [1] float32
    v_scale: torch.Tensor | None = None       # [1] float32
    max_seq_len: int = field(init=False)

    def __post_init__(self):
        self.max_seq_len = int(self.seq_lens.max()) if self.seq_lens.numel() else 0

    def op_args(self, out: torch.Tensor) -> tuple:
        """Positional arguments of the raw op `torch.ops.<namespace>.paged_attention`."""
        return (out, self.query, self.key_cache, self.value_cache, self.block_tables,
                self.seq_lens, self.scale, self.max_seq_len, self.alibi_slopes,
                self.sliding_window, self.logits_soft_cap, self.k_scale, self.v_scale)

    def run(self, raw_op) -> torch.Tensor:
        """Calls a raw paged_attention op with a NaN-poisoned output and returns the output."""
        out = torch.full_like(self.query, float("nan"))
        raw_op(*self.op_args(out))
        return out

    def reference(self) -> torch.Tensor:
        return reference.paged_attention(
            self.query, self.key_cache, self.value_cache, self.block_tables, self.seq_lens,
            self.scale, alibi_slopes=self.alibi_slopes, sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap, k_scale=self.k_scale, v_scale=self.v_scale)

    def low_precision_baseline(self) -> torch.Tensor:
        """The same attention computed by plain PyTorch ops in the query's dtype."""
        dtype = self.query.dtype
        block_size, num_kv_heads = self.key_cache.shape[1], self.key_cache.shape[2]
        group_size = self.query.shape[1] // num_kv_heads
        out = torch.zeros_like(self.query)
        for seq, seq_len in enumerate(self.seq_lens.tolist()):
            if seq_len == 0:
                continue
            positions = reference.attended_positions(seq_len, self.sliding_window)
            blocks = self.block_tables[seq].long()[positions // block_size]
            offsets = positions % block_size
            keys = reference.dequantize(self.key_cache[blocks, offsets], self.k_scale).to(dtype)
            values = reference.dequantize(self.value_cache[blocks, offsets], self.v_scale).to(dtype)
            keys = keys.repeat_interleave(group_size, dim=1)
            values = values.repeat_interleave(group_size, dim=1)
            scores = torch.einsum("hd,nhd->hn", self.query[seq], keys) * self.scale
            if self.logits_soft_cap > 0:
                scores = self.logits_soft_cap * torch.tanh(scores / self.logits_soft_cap)
            if self.alibi_slopes is not None:
                distance = (positions - (seq_len - 1)).to(dtype)
                scores = scores + self.alibi_slopes.to(dtype)[:, None] * distance[None, :]
            out[seq] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), values)
        return out


def make_decode_case(
    *,
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    kv_dtype: torch.dtype | None = None,
    layout: str = "nhd",
    alibi: bool = False,
    sliding_window: int = 0,
    logits_soft_cap: float = 0.0,
    spare_blocks: int = 3,
    seed: int = 0,
    device: str = "cpu",
) -> DecodeCase:
    """Builds a decode batch whose sequences own shuffled physical blocks of a NaN-filled pool.

    With a sliding window, the table entries of blocks wholly outside the window are -1 (as if
    released), so a kernel that reads them fails. kv_dtype=torch.float8_e4m3fn gives an fp8 cache
    with per-tensor scales.
    """
    generator = torch.Generator().manual_seed(seed)
    kv_dtype = kv_dtype or dtype
    blocks_per_seq = [(length + block_size - 1) // block_size for length in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    max_blocks = max(blocks_per_seq, default=0) + 1
    physical = torch.randperm(num_blocks, generator=generator).tolist()

    key_cache, value_cache = empty_cache_pair(num_blocks, block_size, num_kv_heads, head_size,
                                              kv_dtype, layout, device)
    block_tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    total_tokens = sum(seq_lens)
    keys = torch.randn(total_tokens, num_kv_heads, head_size, generator=generator)
    values = torch.randn(total_tokens, num_kv_heads, head_size, generator=generator)
    k_scale = v_scale = None
    if kv_dtype == FP8:
        k_scale, v_scale = fp8_scale_for(keys), fp8_scale_for(values)

    token = 0
    for seq, (length, num_seq_blocks) in enumerate(zip(seq_lens, blocks_per_seq)):
        first_attended = max(0, length - sliding_window) if sliding_window > 0 else 0
        for logical in range(num_seq_blocks):
            block = physical.pop()
            if (logical + 1) * block_size > first_attended:
                block_tables[seq, logical] = block
            filled = min(block_size, length - logical * block_size)
            rows = slice(token, token + filled)
            key_cache[block, :filled] = reference.quantize(keys[rows], kv_dtype, k_scale).to(device)
            value_cache[block, :filled] = reference.quantize(values[rows], kv_dtype, v_scale).to(device)
            token += filled

    query = torch.randn(len(seq_lens), num_heads, head_size, generator=generator).to(dtype)
    slopes = None
    if alibi:
        slopes = torch.rand(num_heads, generator=generator) * 0.5 + 0.01
    return DecodeCase(
        query=query.to(device), key_cache=key_cache, value_cache=value_cache,
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        scale=head_size ** -0.5,
        alibi_slopes=None if slopes is None else slopes.to(device),
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
        k_scale=None if k_scale is None else k_scale.to(device),
        v_scale=None if v_scale is None else v_scale.to(device))


def assert_matches_reference(actual: torch.Tensor, case: DecodeCase) -> None:
    """Checks a kernel's output against the float64 reference with the dtype's tolerance."""
    actual = actual.cpu()
    assert not torch.isnan(actual).any(), "output holds NaN (unwritten output or stray read)"
    expected = case.reference()
    error = (actual.to(torch.float64) - expected).abs().max().item() if actual.numel() else 0.0
    magnitude = expected.abs().max().item() if expected.numel() else 0.0
    if actual.dtype == torch.float32:
        allowed = 1e-5 * max(magnitude, 1.0)
    else:
        baseline = case.low_precision_baseline().cpu().to(torch.float64)
        baseline_error = (baseline - expected).abs().max().item() if expected.numel() else 0.0
        allowed = 2 * baseline_error + LOW_PRECISION_ATOL[actual.dtype]
    assert error <= allowed, (
        f"max error {error:.3g} exceeds {allowed:.3g} ({actual.dtype}, output magnitude {magnitude:.3g})")
