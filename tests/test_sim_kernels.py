"""The CUDA kernels, executed on the CPU by the SIMT emulator, against paged_attn/reference.py.

`torch.ops.paged_attn_sim.*` run the csrc/cuda launchers and kernels, compiled by g++ against the
emulator, on CPU tensors. Every test runs three times, with the emulated threads scheduled in
forward, reverse and random order (SIMT_ORDER, which the emulator reads at every launch), so a
missing barrier changes the result. Tests marked `asan_subset` execute every kernel and both
decode paths; CI runs them once more under AddressSanitizer + UBSan (see paged_attn/sim.py).
"""

import pytest
import torch

import paged_attn.sim as sim
from cases import FP8, assert_matches_reference, case_id, make_decode_case
from kernel_checks import (
    check_copy_blocks,
    check_swap_blocks,
    check_write_kv,
    decode_case,
    decode_grid,
)

OPS = torch.ops.paged_attn_sim
ORDERS = ["forward", "reverse", "random"]
DECODE_PATHS = ["one_pass", "split_k", "auto"]
PARTITION_SIZE = 32  # short partitions so split-K runs with several of them on short contexts


@pytest.fixture(autouse=True, params=ORDERS)
def simt_order(request, monkeypatch):
    monkeypatch.setenv("SIMT_ORDER", request.param)
    monkeypatch.setenv("SIMT_SEED", "20261122")
    return request.param


def asan_marked(rows: list[dict]) -> list:
    """The decode rows as pytest params; the first row of each path joins the ASan subset."""
    params, marked_paths = [], set()
    for row in rows:
        marks = []
        if row["path"] not in marked_paths:
            marked_paths.add(row["path"])
            marks.append(pytest.mark.asan_subset)
        params.append(pytest.param(row, id=case_id(row), marks=marks))
    return params


@pytest.mark.parametrize("row", asan_marked(decode_grid(DECODE_PATHS)))
def test_paged_attention(row):
    case = decode_case(row)
    with sim.decode_config(row["path"], partition_size=PARTITION_SIZE):
        out = case.run(OPS.paged_attention)
    assert_matches_reference(out, case)


@pytest.mark.parametrize("path", ["one_pass", "split_k"])
def test_paged_attention_restages_block_table(path):
    """Block size 1 over 200 tokens: a tile's table entries are restaged several times."""
    case = make_decode_case(seq_lens=[200, 150], num_heads=4, num_kv_heads=2, head_size=64,
                            block_size=1, sliding_window=170)
    with sim.decode_config(path, partition_size=PARTITION_SIZE):
        out = case.run(OPS.paged_attention)
    assert_matches_reference(out, case)


def test_paged_attention_strided_query_and_out():
    """query and out as views with gaps between heads and sequences (e.g. slices of qkv)."""
    case = make_decode_case(seq_lens=[5, 40], num_heads=8, num_kv_heads=2, head_size=80,
                            block_size=16, dtype=torch.float16)
    case.query = torch.cat([case.query, torch.randn_like(case.query)], dim=-1)[..., :80]
    out = torch.full((2, 8, 96), float("nan"), dtype=torch.float16)[..., :80]
    with sim.decode_config("split_k", partition_size=PARTITION_SIZE):
        OPS.paged_attention(*case.op_args(out))
    assert_matches_reference(out, case)


@pytest.mark.parametrize("path", ["one_pass", "split_k"])
def test_paged_attention_empty_batch_and_zero_lengths(path):
    """seq_len 0 everywhere (max_seq_len 0) gives zero rows; an empty batch launches nothing."""
    case = make_decode_case(seq_lens=[0, 0], num_heads=4, num_kv_heads=4, head_size=64,
                            block_size=16)
    with sim.decode_config(path, partition_size=PARTITION_SIZE):
        out = case.run(OPS.paged_attention)
        assert torch.equal(out, torch.zeros_like(out))
        empty = make_decode_case(seq_lens=[], num_heads=4, num_kv_heads=4, head_size=64,
                                 block_size=16)
        assert empty.run(OPS.paged_attention).shape == (0, 4, 64)


WRITE_KV_ROWS = [
    # dtype, cache dtype, layout, head_size
    (torch.float32, torch.float32, "nhd", 64),
    (torch.float16, torch.float16, "hnd", 80),
    (torch.bfloat16, torch.bfloat16, "interleaved_kv", 256),
    (torch.float32, FP8, "padded_heads", 96),
    (torch.float16, FP8, "nhd", 112),
    (torch.bfloat16, FP8, "hnd", 192),
    (torch.float32, torch.float32, "nhd", 8),  # 32-byte rows: write_kv takes any aligned size
]


@pytest.mark.parametrize(
    "dtype,cache_dtype,layout,head_size",
    [pytest.param(*row, marks=[pytest.mark.asan_subset] if row[1] == FP8 or index == 0 else [])
     for index, row in enumerate(WRITE_KV_ROWS)])
def test_write_kv(dtype, cache_dtype, layout, head_size):
    check_write_kv(OPS, dtype=dtype, cache_dtype=cache_dtype, layout=layout, head_size=head_size)


@pytest.mark.parametrize("num_layers,dtype,layout", [
    pytest.param(1, torch.float16, "nhd", marks=pytest.mark.asan_subset),
    (3, torch.float32, "hnd"),
    (2, FP8, "interleaved_kv"),
    (2, torch.bfloat16, "padded_heads"),
])
def test_copy_blocks(num_layers, dtype, layout):
    check_copy_blocks(OPS, num_layers=num_layers, dtype=dtype, layout=layout)


def test_copy_blocks_deeper_than_one_launch():
    """130 layers: the per-layer pointers of 128 fit one launch's parameters, the rest take a
    second launch."""
    check_copy_blocks(OPS, num_layers=130, dtype=torch.float16, layout="nhd", head_size=16)


@pytest.mark.parametrize("src_layout,dst_layout,mapping", [
    # consecutive blocks to consecutive blocks: merged into one memcpy
    pytest.param("nhd", "nhd", [[0, 5], [1, 6], [2, 7], [4, 0]], marks=pytest.mark.asan_subset),
    ("hnd", "hnd", [[3, 1], [4, 2], [0, 7]]),
    ("nhd", "hnd", [[5, 0], [1, 3]]),  # different layouts: row by row
    ("padded_heads", "interleaved_kv", [[2, 2], [3, 3]]),
])
def test_swap_blocks(src_layout, dst_layout, mapping):
    check_swap_blocks(OPS, dtype=torch.bfloat16, src_layout=src_layout, dst_layout=dst_layout,
                      mapping=mapping)


# ---- errors: the sim ops share core/checks.cpp; the CUDA-only checks live in the launchers ----

def test_rejects_unsupported_head_size():
    case = make_decode_case(seq_lens=[3], num_heads=2, num_kv_heads=2, head_size=72, block_size=16)
    out = torch.full_like(case.query, float("nan"))
    with pytest.raises(RuntimeError, match="head_size 72 .*64, 80, 96, 112, 128, 192, 256"):
        OPS.paged_attention(*case.op_args(out))
    assert out.isnan().all(), "a rejected call must not write its output"


def test_rejects_misaligned_cache_strides():
    # float32 rows of 64 + 2 elements: a 264-byte token stride is no multiple of 16 bytes.
    case = make_decode_case(seq_lens=[3], num_heads=2, num_kv_heads=1, head_size=64, block_size=4)
    wide = torch.zeros(*case.key_cache.shape[:3], 66)
    wide[..., :64] = case.key_cache
    case.key_cache = wide[..., :64]
    with pytest.raises(RuntimeError, match="16-byte aligned cache strides.*key_cache.*token stride 264"):
        OPS.paged_attention(*case.op_args(torch.empty_like(case.query)))


def test_rejects_misaligned_write_kv_cache():
    key = torch.randn(2, 1, 64)
    cache = torch.zeros(4, 4, 1, 66)[..., 2:]  # base pointer 8 bytes past a 16-byte boundary
    with pytest.raises(RuntimeError, match="16-byte aligned.*key_cache's data pointer is 8 bytes"):
        OPS.write_kv(key, key, cache, cache.clone(), torch.tensor([0, 1]), None, None)


def test_rejects_dtype_mismatch_through_shared_checks():
    case = make_decode_case(seq_lens=[3], num_heads=2, num_kv_heads=2, head_size=64, block_size=16)
    case.value_cache = case.value_cache.half()
    with pytest.raises(RuntimeError, match="value_cache.*dtype"):
        OPS.paged_attention(*case.op_args(torch.empty_like(case.query)))


def test_rejects_block_id_out_of_range_through_shared_checks():
    case = make_decode_case(seq_lens=[20], num_heads=2, num_kv_heads=2, head_size=64, block_size=16)
    case.block_tables[0, 1] = 999
    with pytest.raises(RuntimeError, match=r"block_tables\[0\]\[1\] = 999"):
        OPS.paged_attention(*case.op_args(torch.empty_like(case.query)))


def test_decode_config_rejects_unknown_path():
    with pytest.raises(ValueError, match="path must be one of"):
        sim.set_decode_config("sometimes")
