"""Every paged_attn op is complete: a Python wrapper, a CPU kernel, a CUDA kernel when CUDA was
built, and an opcheck sample; opcheck passes on every op, and torch.compile(fullgraph=True)
traces write + decode without a graph break."""

import pytest
import torch

import paged_attn
from paged_attn import ops
from cases import make_decode_case


def registered_op_names() -> list[str]:
    prefix = "paged_attn::"
    return sorted(name[len(prefix):] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith(prefix))


def decode_sample():
    case = make_decode_case(seq_lens=[7, 1, 19], num_heads=8, num_kv_heads=2, head_size=64,
                            block_size=4)
    return case.op_args(torch.empty_like(case.query))


def write_sample():
    key, value = torch.randn(5, 2, 64), torch.randn(5, 2, 64)
    key_cache, value_cache = torch.zeros(3, 4, 2, 64), torch.zeros(3, 4, 2, 64)
    slots = torch.tensor([0, 5, -1, 11, 6])
    return key, value, key_cache, value_cache, slots, None, None


def copy_sample():
    keys = [torch.randn(4, 4, 2, 64) for _ in range(2)]
    values = [torch.randn(4, 4, 2, 64) for _ in range(2)]
    return keys, values, torch.tensor([[0, 2], [0, 3]])


def swap_sample():
    return torch.randn(4, 4, 2, 64), torch.zeros(3, 4, 2, 64), torch.tensor([[3, 0], [1, 2]])


OPCHECK_SAMPLES = {
    "paged_attention": decode_sample,
    "write_kv": write_sample,
    "copy_blocks": copy_sample,
    "swap_blocks": swap_sample,
}


def test_registry_is_complete():
    names = registered_op_names()
    assert names == sorted(ops.OP_NAMES), f"registered ops {names} differ from ops.OP_NAMES"
    for name in names:
        qualified = f"paged_attn::{name}"
        assert callable(getattr(paged_attn, name, None)), f"{name} lacks a Python wrapper"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU"), f"{name}: no CPU kernel"
        if paged_attn.BUILT_WITH_CUDA:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"), f"{name}: no CUDA kernel"
        assert name in OPCHECK_SAMPLES, f"{name} lacks an opcheck sample"


@pytest.mark.parametrize("name", sorted(OPCHECK_SAMPLES))
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.paged_attn, name).default, OPCHECK_SAMPLES[name]())


def test_compile_write_then_decode_fullgraph():
    case = make_decode_case(seq_lens=[9, 30], num_heads=4, num_kv_heads=2, head_size=64,
                            block_size=8, spare_blocks=4)
    # Write one more token for each sequence into its last block, then decode.
    new_key, new_value = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    block_size = case.key_cache.shape[1]
    lens = case.seq_lens.long()
    slots = case.block_tables.long().gather(1, (lens // block_size)[:, None])[:, 0] * block_size + lens % block_size
    assert (slots >= 0).all(), "the new token's block must already be mapped in this sample"
    grown_lens = case.seq_lens + 1
    max_seq_len = int(grown_lens.max())  # a host integer, as a serving loop would pass it

    def step(key_cache, value_cache):
        paged_attn.write_kv(new_key, new_value, key_cache, value_cache, slots)
        return paged_attn.paged_attention(case.query, key_cache, value_cache, case.block_tables,
                                          grown_lens, max_seq_len=max_seq_len)

    eager_caches = (case.key_cache.clone(), case.value_cache.clone())
    compiled_caches = (case.key_cache.clone(), case.value_cache.clone())
    expected = step(*eager_caches)
    actual = torch.compile(step, fullgraph=True)(*compiled_caches)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    for eager, compiled in zip(eager_caches, compiled_caches):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0, equal_nan=True)
    assert not torch.isnan(actual).any()
