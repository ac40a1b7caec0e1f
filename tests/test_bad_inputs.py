"""Bad input fails with a clear error naming the argument, and leaves every tensor untouched.

One test per class of mistake, on the CPU backend, where every check (including the ones that
read block ids, lengths, slots and mappings) always runs.
"""

import pytest
import torch

import paged_attn
from cases import FP8, make_decode_case

OPS = torch.ops.paged_attn


def snapshot(*tensors):
    return [t.clone() for t in tensors]


def assert_unchanged(before, after):
    for old, new in zip(before, after):
        assert torch.equal(old.view(torch.uint8), new.view(torch.uint8)), "a tensor was modified"


@pytest.fixture
def case():
    return make_decode_case(seq_lens=[5, 20, 0], num_heads=4, num_kv_heads=2, head_size=64,
                            block_size=8)


def call_decode(case, expect_error: str, out=None, **overrides):
    """Runs the raw op with one argument replaced and checks the error and that nothing changed."""
    out = torch.full_like(case.query, float("nan")) if out is None else out
    args = dict(out=out, query=case.query, key_cache=case.key_cache, value_cache=case.value_cache,
                block_tables=case.block_tables, seq_lens=case.seq_lens, scale=case.scale,
                max_seq_len=case.max_seq_len, alibi_slopes=None, sliding_window=0,
                logits_soft_cap=0.0, k_scale=None, v_scale=None)
    args.update(overrides)
    before = snapshot(args["out"], case.key_cache, case.value_cache)
    with pytest.raises(RuntimeError, match=expect_error):
        OPS.paged_attention(*args.values())
    assert_unchanged(before, [args["out"], case.key_cache, case.value_cache])


def test_wrong_rank(case):
    call_decode(case, r"'query' must have shape \[num_seqs, num_heads, head_size\]",
                query=case.query[0], out=case.query[0].clone())


def test_wrong_dtype(case):
    call_decode(case, r"'block_tables' must have dtype Int", block_tables=case.block_tables.long())
    call_decode(case, r"'query' must have one of the dtypes", query=case.query.double(),
                out=case.query.double())
    call_decode(case, r"'value_cache' must have dtype", value_cache=case.value_cache.half())


def test_out_aliasing_query(case):
    call_decode(case, r"'out' must not share memory with 'query'", out=case.query)


def test_head_count_not_divisible():
    odd = make_decode_case(seq_lens=[3], num_heads=6, num_kv_heads=4, head_size=64, block_size=8)
    call_decode(odd, r"num_heads \(6\) must be a positive multiple of num_kv_heads \(4\)")


def test_head_size_mismatch(case):
    call_decode(case, r"'key_cache' .* must be query's head_size", query=case.query[..., :32],
                out=case.query[..., :32].clone())


@pytest.mark.parametrize("bad_block", [-1, 10_000])
def test_block_id_out_of_range(case, bad_block):
    tables = case.block_tables.clone()
    tables[1, 2] = bad_block  # sequence 1 (length 20, block 8) uses blocks 0..2
    call_decode(case, rf"block_tables\[1\]\[2\] = {bad_block} is outside \[0, num_blocks",
                block_tables=tables)


def test_block_table_too_short(case):
    call_decode(case, r"block_tables has 2 columns but sequence 1 .* needs 3",
                block_tables=case.block_tables[:, :2])


def test_max_seq_len_too_small(case):
    call_decode(case, r"max_seq_len \(19\) is smaller than seq_lens\[1\] = 20", max_seq_len=19)


def test_negative_seq_len(case):
    lens = case.seq_lens.clone()
    lens[2] = -1
    call_decode(case, r"seq_lens\[2\] = -1 is negative", seq_lens=lens)


def test_fp8_without_scales():
    fp8 = make_decode_case(seq_lens=[3], num_heads=2, num_kv_heads=2, head_size=64, block_size=8,
                           kv_dtype=FP8)
    call_decode(fp8, r"float8_e4m3fn caches need argument 'k_scale'", v_scale=fp8.v_scale)
    call_decode(fp8, r"float8_e4m3fn caches need argument 'v_scale'", k_scale=fp8.k_scale)


def test_scale_on_non_fp8_cache(case):
    call_decode(case, r"'k_scale' is only meaningful for float8_e4m3fn caches",
                k_scale=torch.ones(1), v_scale=torch.ones(1))


def write_args(num_tokens=4, num_blocks=3, block_size=4, heads=2, head_size=64):
    key = torch.randn(num_tokens, heads, head_size)
    value = torch.randn(num_tokens, heads, head_size)
    key_cache = torch.randn(num_blocks, block_size, heads, head_size)
    value_cache = torch.randn(num_blocks, block_size, heads, head_size)
    slots = torch.arange(num_tokens, dtype=torch.int64)
    return key, value, key_cache, value_cache, slots


@pytest.mark.parametrize("bad_slot, message", [
    (12, r"slot_mapping\[1\] = 12 is outside the cache"),
    (-2, r"slot_mapping\[1\] = -2 is outside the cache"),
    (0, r"slot 0 appears more than once"),
])
def test_slot_outside_cache(bad_slot, message):
    key, value, key_cache, value_cache, slots = write_args()
    slots[1] = bad_slot
    before = snapshot(key_cache, value_cache)
    with pytest.raises(RuntimeError, match=message):
        OPS.write_kv(key, value, key_cache, value_cache, slots, None, None)
    assert_unchanged(before, [key_cache, value_cache])


def test_write_fp8_without_scales():
    key, value, key_cache, value_cache, slots = write_args()
    with pytest.raises(RuntimeError, match=r"float8_e4m3fn caches need argument 'k_scale'"):
        OPS.write_kv(key, value, key_cache.to(FP8), value_cache.to(FP8), slots, None, None)


def test_write_shape_mismatch():
    key, value, key_cache, value_cache, slots = write_args()
    with pytest.raises(RuntimeError, match=r"'value' must have the shape of 'key'"):
        OPS.write_kv(key, value[:, :1], key_cache, value_cache, slots, None, None)


def layer_caches(num_layers=2, shape=(4, 2, 2, 64)):
    return ([torch.randn(shape) for _ in range(num_layers)],
            [torch.randn(shape) for _ in range(num_layers)])


@pytest.mark.parametrize("pairs, message", [
    ([[0, 4]], r"block_mapping\[0\] dst block 4 is outside \[0, 4\)"),
    ([[-1, 2]], r"block_mapping\[0\] src block -1 is outside"),
    ([[0, 2], [1, 2]], r"writes dst block 2 more than once"),
    ([[0, 1], [1, 2]], r"block 1 is both a src and a dst"),
])
def test_copy_mapping_out_of_range(pairs, message):
    keys, values = layer_caches()
    before = snapshot(*keys, *values)
    with pytest.raises(RuntimeError, match=message):
        OPS.copy_blocks(keys, values, torch.tensor(pairs, dtype=torch.int64))
    assert_unchanged(before, keys + values)


def test_copy_mismatched_layers():
    keys, values = layer_caches()
    keys[1] = torch.randn(4, 2, 2, 32)
    with pytest.raises(RuntimeError, match=r"'key_caches\[1\]' must have the shape of 'layer 0'"):
        OPS.copy_blocks(keys, values, torch.tensor([[0, 1]]))
    keys, values = layer_caches()
    with pytest.raises(RuntimeError, match=r"key_caches has 2 layers but value_caches has 1"):
        OPS.copy_blocks(keys, values[:1], torch.tensor([[0, 1]]))


def test_swap_mapping_out_of_range():
    src, dst = torch.randn(4, 2, 2, 64), torch.randn(3, 2, 2, 64)
    before = snapshot(dst)
    with pytest.raises(RuntimeError, match=r"dst block 3 is outside \[0, 3\)"):
        OPS.swap_blocks(src, dst, torch.tensor([[3, 3]]))
    with pytest.raises(RuntimeError, match=r"src block 4 is outside \[0, 4\)"):
        OPS.swap_blocks(src, dst, torch.tensor([[4, 0]]))
    assert_unchanged(before, [dst])


def test_swap_mismatched_shapes():
    src, dst = torch.randn(4, 2, 2, 64), torch.randn(3, 2, 2, 32)
    with pytest.raises(RuntimeError, match=r"'dst' .* must be src's head_size"):
        OPS.swap_blocks(src, dst, torch.tensor([[0, 0]]))
    with pytest.raises(RuntimeError, match=r"'dst' must have dtype Float"):
        OPS.swap_blocks(src, dst.half(), torch.tensor([[0, 0]]))


def test_wrapper_defaults_match_explicit_arguments(case):
    explicit = case.run(OPS.paged_attention)
    wrapped = paged_attn.paged_attention(case.query, case.key_cache, case.value_cache,
                                         case.block_tables, case.seq_lens)
    torch.testing.assert_close(wrapped, explicit, rtol=0, atol=0)
