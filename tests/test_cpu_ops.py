"""The CPU kernels of every paged_attn op against the float64 oracle in paged_attn/reference.py.

Every test runs each CPU variant: the portable C++ kernels, the AVX-512 ones, AVX-512 with
AMX tiles for bf16 scores and value sums, and the same AMX code on the software model of the
tiles (csrc/cpu/amx_tiles.h), chosen through the PAGED_ATTN_CPU_ISA override (see
csrc/cpu/isa.h). The model is what executes the AMX code on a CPU without AMX; on a CPU without
a variant, that variant must refuse with a clear error instead of running, so no test skips. Inputs come from
tests/cases.py: shuffled physical blocks, NaN in every unused cache slot and in the output.
"""

import pathlib

import pytest
import torch

import paged_attn
from paged_attn import reference
from cases import (FP8, LAYOUTS, assert_matches_reference, case_id, empty_cache_pair,
                   fp8_scale_for, make_decode_case, pairwise)

OPS = torch.ops.paged_attn
ISAS = ("portable", "avx512", "amx", "amx-emulated")
# The /proc/cpuinfo flags each variant needs (what csrc/cpu/isa.cpp checks through cpuid).
ISA_FLAGS = {"portable": (), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
             "amx": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16"),
             "amx-emulated": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")}


def cpu_has(isa: str) -> bool:
    text = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return all(flag in flags for flag in ISA_FLAGS[isa])


def use_isa(monkeypatch, isa: str) -> str:
    """Selects a kernel variant. On a CPU without it, checks that it refuses clearly and falls
    back to the automatic choice, so the test still runs."""
    monkeypatch.setenv("PAGED_ATTN_CPU_ISA", isa)
    if cpu_has(isa):
        return isa
    case = make_decode_case(seq_lens=[3], num_heads=2, num_kv_heads=1, head_size=64, block_size=4)
    with pytest.raises(ValueError, match="lacks"):
        case.run(OPS.paged_attention)
    monkeypatch.setenv("PAGED_ATTN_CPU_ISA", "auto")
    return "auto"


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    return use_isa(monkeypatch, request.param)


def run_and_check(case):
    out = case.run(OPS.paged_attention)
    assert_matches_reference(out, case)
    return out


# ---------------------------------------------------------------------------------------------
# paged_attention

DECODE_GRID = pairwise({
    "isa": list(ISAS),
    "dtype": [torch.float32, torch.float16, torch.bfloat16],
    "fp8_cache": [False, True],
    "heads": [(4, 4), (8, 2), (16, 2)],  # (num_heads, num_kv_heads): GQA ratios 1, 4 and 8
    "head_size": [64, 80, 128, 256],
    "block_size": [1, 16, 64],
    "layout": list(LAYOUTS),
    "lengths": ["edge", "batch17", "long"],
    "feature": ["plain", "alibi", "window", "soft_cap", "all"],
}, seed=1)

LENGTHS = {
    # 0 and 1 tokens, one token past a block boundary, lengths that are not block multiples.
    "edge": [0, 1, 2, 17, 65, 130],
    # 17 sequences of unequal lengths: dynamic scheduling and odd batch size.
    "batch17": [(37 * i) % 301 for i in range(17)],
    # Long enough to be split into partitions that the combine step merges.
    "long": [2500, 1, 700],
}
FEATURES = {
    "plain": {},
    "alibi": {"alibi": True},
    "window": {"sliding_window": 100},
    "soft_cap": {"logits_soft_cap": 5.0},
    "all": {"alibi": True, "sliding_window": 37, "logits_soft_cap": 8.0},
}


@pytest.mark.parametrize("params", DECODE_GRID, ids=case_id)
def test_paged_attention_matches_reference(params, monkeypatch):
    use_isa(monkeypatch, params["isa"])
    num_heads, num_kv_heads = params["heads"]
    case = make_decode_case(
        seq_lens=LENGTHS[params["lengths"]], num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_size=params["head_size"], block_size=params["block_size"], dtype=params["dtype"],
        kv_dtype=FP8 if params["fp8_cache"] else None, layout=params["layout"],
        **FEATURES[params["feature"]])
    run_and_check(case)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_context_partitions_agree_with_one_pass(isa, dtype, threads):
    """With 2 threads one long sequence is split into partitions and merged; with 1 thread it
    runs in one pass. Both must match the oracle."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        case = make_decode_case(seq_lens=[6000], num_heads=8, num_kv_heads=2, head_size=128,
                                block_size=32, dtype=dtype, seed=threads)
        run_and_check(case)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads", [24, 32])
def test_gqa_groups_wider_than_one_register_tile(isa, dtype, num_heads):
    """12 and 16 query heads per KV head: the value accumulation splits a group into tiles."""
    case = make_decode_case(seq_lens=[70, 33], num_heads=num_heads, num_kv_heads=2, head_size=64,
                            block_size=16, dtype=dtype)
    run_and_check(case)


AMX_GRID = pairwise({
    "heads": [(8, 8), (16, 4), (32, 4), (24, 2), (32, 2)],  # GQA 1, 4, 8, 12, 16 (tile widths)
    "head_size": [64, 96, 128, 256],  # 2, 3, 4 and 8 value-sum tiles
    "block_size": [16, 32, 128],
    "layout": ["nhd", "hnd", "interleaved_kv"],
    "window": [0, 45],
}, seed=6)


@pytest.mark.parametrize("params", AMX_GRID, ids=case_id)
def test_bf16_on_every_tile_shape(params, monkeypatch):
    """bf16 attention with each variant on shapes where AMX tiles apply (head sizes multiple of
    32): scores for up to 16 heads per group (whole groups of 16 tokens on tiles, remainders on
    AVX-512), value sums for up to 8 (partial groups of tokens zero-padded, wider groups on
    AVX-512), head sizes past 128 in several passes of value tiles."""
    num_heads, num_kv_heads = params["heads"]
    case = make_decode_case(seq_lens=[1, 15, 16, 17, 200, 333], num_heads=num_heads,
                            num_kv_heads=num_kv_heads, head_size=params["head_size"],
                            block_size=params["block_size"], dtype=torch.bfloat16,
                            layout=params["layout"], sliding_window=params["window"])
    for isa in ISAS:
        use_isa(monkeypatch, isa)
        run_and_check(case)


@pytest.mark.parametrize("dtype,num_kv_heads", [(torch.float32, 17), (torch.bfloat16, 34)])
@pytest.mark.parametrize("window", [0, 45])
def test_wide_rows_take_narrow_spans(isa, dtype, num_kv_heads, window):
    """Items whose token rows exceed 8 KiB walk blocks in 16-token spans instead of 32 (fp32 with
    17 KV heads of 128, bf16 with 34): spans that start mid-block under a sliding window, blocks
    of 64 holding four spans, sequences ending inside a span."""
    case = make_decode_case(seq_lens=[1, 15, 16, 17, 100, 200, 33, 64, 65], num_heads=num_kv_heads,
                            num_kv_heads=num_kv_heads, head_size=128, block_size=64, dtype=dtype,
                            sliding_window=window)
    run_and_check(case)


def test_values_past_the_sequence_never_leak(isa):
    """The last block's unused V (and K) slots hold NaN and huge values; neither may reach the
    output, even multiplied by a zero weight."""
    case = make_decode_case(seq_lens=[5, 13], num_heads=4, num_kv_heads=2, head_size=64,
                            block_size=8)
    for seq, length in enumerate(case.seq_lens.tolist()):
        last = int(case.block_tables[seq, (length - 1) // 8])
        case.value_cache[last, length % 8:] = float("nan")
        case.key_cache[last, length % 8:] = 1e30
    run_and_check(case)


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_every_fp8_code_dequantizes_exactly(isa, query_dtype):
    """One token: softmax weight 1, so the output is that token's dequantized V row. The row
    holds all 256 e4m3 codes (NaN codes replaced by 0) across two heads of 128."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0
    value_cache = codes.view(FP8).reshape(1, 1, 2, 128).clone()
    key_cache = torch.zeros_like(value_cache)
    query = torch.randn(1, 2, 128).to(query_dtype)
    k_scale, v_scale = torch.tensor([0.5]), torch.tensor([1.0])
    out = torch.full_like(query, float("nan"))
    OPS.paged_attention(out, query, key_cache, value_cache, torch.zeros(1, 1, dtype=torch.int32),
                        torch.tensor([1], dtype=torch.int32), 0.1, 1, None, 0, 0.0, k_scale, v_scale)
    expected = value_cache.float().reshape(1, 2, 128).to(query_dtype)
    assert torch.equal(out, expected)


def test_alibi_matches_bloom_convention(isa):
    """Slopes from transformers' build_alibi_tensor. Bloom adds slope * key_position; we add
    slope * (key_position - last_position): a constant per row, so softmax (and the output)
    must agree with attention under Bloom's own bias."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    num_heads, seq_len = 8, 45
    bloom_bias = build_alibi_tensor(torch.ones(1, seq_len), num_heads, torch.float32)[:, 0, :]
    slopes = bloom_bias[:, 1].contiguous()  # bias at key position 1 is the slope itself
    assert torch.equal(bloom_bias, slopes[:, None] * torch.arange(seq_len, dtype=torch.float32))

    case = make_decode_case(seq_lens=[seq_len], num_heads=num_heads, num_kv_heads=num_heads,
                            head_size=64, block_size=16)
    case.alibi_slopes = slopes
    out = case.run(OPS.paged_attention)

    blocks = case.block_tables[0].long()[torch.arange(seq_len) // 16]
    keys = case.key_cache[blocks, torch.arange(seq_len) % 16].double()      # [seq, heads, dim]
    values = case.value_cache[blocks, torch.arange(seq_len) % 16].double()
    scores = torch.einsum("hd,nhd->hn", case.query[0].double(), keys) * case.scale
    weights = torch.softmax(scores + bloom_bias.double(), dim=-1)
    expected = torch.einsum("hn,nhd->hd", weights, values)
    torch.testing.assert_close(out[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_isa_override_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("PAGED_ATTN_CPU_ISA", "sse9")
    case = make_decode_case(seq_lens=[3], num_heads=2, num_kv_heads=1, head_size=64, block_size=4)
    with pytest.raises(ValueError, match="PAGED_ATTN_CPU_ISA must be auto, portable, avx512, amx or amx-emulated"):
        case.run(OPS.paged_attention)


# ---------------------------------------------------------------------------------------------
# write_kv

def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor):
    """Equal bit patterns, so NaN slots must stay NaN and fp8 codes must match exactly."""
    bytes_view = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    assert torch.equal(bytes_view(actual), bytes_view(expected))


WRITE_GRID = pairwise({
    "isa": list(ISAS),
    "dtype": [torch.float32, torch.float16, torch.bfloat16],
    "fp8_cache": [False, True],
    "layout": list(LAYOUTS),
    "block_size": [1, 16, 64],
    "head_size": [64, 80, 256],
    "strided_input": [False, True],
}, seed=2)


@pytest.mark.parametrize("params", WRITE_GRID, ids=case_id)
def test_write_kv_matches_reference(params, monkeypatch):
    use_isa(monkeypatch, params["isa"])
    generator = torch.Generator().manual_seed(3)
    num_blocks, block_size, num_kv_heads, head_size = 7, params["block_size"], 2, params["head_size"]
    cache_dtype = FP8 if params["fp8_cache"] else params["dtype"]
    key_cache, value_cache = empty_cache_pair(num_blocks, block_size, num_kv_heads, head_size,
                                              cache_dtype, params["layout"])
    num_tokens = min(23, num_blocks * block_size)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    slots[::5] = -1
    shape = (num_tokens, num_kv_heads, head_size)
    if params["strided_input"]:  # heads interleaved with padding, as a slice of a fused QKV
        key = torch.randn(num_tokens, 3 * num_kv_heads, head_size + 8, generator=generator)[:, ::3, :head_size]
        value = torch.randn(num_tokens, 3 * num_kv_heads, head_size + 8, generator=generator)[:, 1::3, :head_size]
    else:
        key, value = torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator)
    key, value = (5 * key).to(params["dtype"]), (5 * value).to(params["dtype"])
    k_scale = v_scale = None
    if params["fp8_cache"]:
        k_scale, v_scale = fp8_scale_for(key), fp8_scale_for(value) * 3  # some values saturate
    expected = reference.write_kv(key, value, key_cache, value_cache, slots, k_scale, v_scale)
    OPS.write_kv(key, value, key_cache, value_cache, slots, k_scale, v_scale)
    assert_bitwise_equal(key_cache, expected[0])
    assert_bitwise_equal(value_cache, expected[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_fp8_rounding_and_saturation(dtype):
    """Ties, denormals, values past the largest fp8 (448), infinities and NaN: the stored code is
    exactly (x.float() / scale).to(float8_e4m3fn)."""
    special = torch.tensor([0.0, -0.0, 448.0, 464.0, 470.0, 480.0, 1e6, -1e6, float("inf"),
                            float("-inf"), float("nan"), 2.0 ** -9, 2.0 ** -10, 1.5 * 2.0 ** -9,
                            3 * 2.0 ** -10, 1.0625, 1.1875, -1.0625, 0.001, -300.0])
    values = torch.cat([special, torch.randn(108) * 100]).reshape(1, 1, 128).to(dtype)
    scale = torch.tensor([0.75])
    key_cache = torch.zeros(1, 1, 1, 128, dtype=FP8)
    value_cache = torch.zeros(1, 1, 1, 128, dtype=FP8)
    OPS.write_kv(values, values, key_cache, value_cache, torch.tensor([0]), scale, scale)
    expected = (values.float() / scale).to(FP8).reshape(1, 1, 1, 128)
    assert_bitwise_equal(key_cache, expected)
    assert_bitwise_equal(value_cache, expected)


# ---------------------------------------------------------------------------------------------
# copy_blocks and swap_blocks

def filled_caches(num_blocks, block_size, num_kv_heads, head_size, dtype, layout, seed):
    """A cache pair of the given layout whose every slot holds a distinct random value."""
    key_cache, value_cache = empty_cache_pair(num_blocks, block_size, num_kv_heads, head_size,
                                              torch.float32 if dtype == FP8 else dtype, layout)
    generator = torch.Generator().manual_seed(seed)
    for cache in (key_cache, value_cache):
        cache.copy_(torch.randn(cache.shape, generator=generator).to(cache.dtype))
    if dtype == FP8:
        return tuple(empty_cache_pair(num_blocks, block_size, num_kv_heads, head_size, FP8, layout)[i]
                     .copy_(cache.to(FP8)) for i, cache in enumerate((key_cache, value_cache)))
    return key_cache, value_cache


COPY_GRID = pairwise({
    "dtype": [torch.float32, torch.float16, torch.bfloat16, FP8],
    "layout": list(LAYOUTS),
    "block_size": [1, 16, 64],
    "layers": [1, 3],
}, seed=4)


@pytest.mark.parametrize("params", COPY_GRID, ids=case_id)
def test_copy_blocks_matches_reference(params):
    shape = (9, params["block_size"], 2, 80)
    layers = [filled_caches(*shape, params["dtype"], params["layout"], seed) for seed in range(params["layers"])]
    key_caches, value_caches = [k for k, _ in layers], [v for _, v in layers]
    # Forks of block 0, consecutive runs (2,3 -> 6,7) and an isolated pair.
    mapping = torch.tensor([[0, 4], [0, 5], [2, 6], [3, 7], [1, 8]])
    expected = reference.copy_blocks(key_caches, value_caches, mapping)
    OPS.copy_blocks(key_caches, value_caches, mapping)
    for actual, wanted in zip(key_caches + value_caches, expected[0] + expected[1]):
        assert_bitwise_equal(actual, wanted)


SWAP_GRID = pairwise({
    "dtype": [torch.float32, torch.float16, torch.bfloat16, FP8],
    "src_layout": list(LAYOUTS),
    "dst_layout": ["nhd", "hnd"],
    "block_size": [1, 16, 64],
}, seed=5)


@pytest.mark.parametrize("params", SWAP_GRID, ids=case_id)
def test_swap_blocks_matches_reference(params):
    block_size = params["block_size"]
    src, _ = filled_caches(10, block_size, 2, 64, params["dtype"], params["src_layout"], seed=1)
    dst, _ = filled_caches(6, block_size, 2, 64, params["dtype"], params["dst_layout"], seed=2)
    # A contiguous run 3,4,5 -> 0,1,2 (one memcpy when dense), then scattered blocks.
    mapping = torch.tensor([[3, 0], [4, 1], [5, 2], [9, 5], [0, 3]])
    expected = reference.swap_blocks(src, dst, mapping)
    OPS.swap_blocks(src, dst, mapping)
    assert_bitwise_equal(dst, expected)


@pytest.mark.parametrize("isa", ["portable", "avx512"])
@pytest.mark.parametrize("layout", ["dense", "padded_heads"])
def test_large_copies_stream_past_the_caches(isa, layout, monkeypatch):
    """Over 4 MiB the cache ops use non-temporal stores on AVX-512 (memcpy on "portable"),
    starting and ending on partial lines when rows are not 64-byte aligned (padded heads)."""
    use_isa(monkeypatch, isa)
    num_blocks, block_size, heads, head_size = 96, 16, 8, 136  # 96 blocks of 68 KiB
    width = head_size + (4 if layout == "padded_heads" else 0)
    source = torch.randn(num_blocks, block_size, heads, width)[..., :head_size]
    target = torch.full((num_blocks, block_size, heads, width), float("nan"))[..., :head_size]
    mapping = torch.stack([torch.arange(num_blocks), torch.randperm(num_blocks)], dim=1)
    paged_attn.swap_blocks(source, target, mapping)
    assert torch.equal(target[mapping[:, 1]], source[mapping[:, 0]])

    caches = [torch.randn(2 * num_blocks, block_size, heads, width)[..., :head_size] for _ in range(2)]
    expected = [cache.clone() for cache in caches]
    pairs = torch.stack([torch.arange(num_blocks), num_blocks + torch.randperm(num_blocks)], dim=1)
    paged_attn.copy_blocks(caches[:1], caches[1:], pairs)
    for cache, before in zip(caches, expected):
        before[pairs[:, 1]] = before[pairs[:, 0]]
        assert torch.equal(cache, before)

    tokens = num_blocks * block_size
    key, value = torch.randn(tokens, heads, head_size), torch.randn(tokens, heads, head_size)
    slots = torch.randperm(tokens).to(torch.int64)
    key_cache = torch.full((num_blocks, block_size, heads, width), float("nan"))[..., :head_size]
    value_cache = torch.full_like(key_cache, float("nan"))
    paged_attn.write_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache.reshape(tokens, heads, head_size)[slots], key)
    assert torch.equal(value_cache.reshape(tokens, heads, head_size)[slots], value)


def test_cache_ops_split_large_copies_across_threads():
    """A copy big enough to be split between workers (the cut can fall inside a block)."""
    src = torch.randn(64, 16, 8, 128)  # 4 MiB
    dst = torch.full((64, 16, 8, 128), float("nan"))
    mapping = torch.stack([torch.arange(64), torch.arange(64).flip(0)], dim=1)
    paged_attn.swap_blocks(src, dst, mapping)
    assert torch.equal(dst, src.flip(0))
