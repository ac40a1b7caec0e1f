"""paged_attn.pools: KV pools backed by transparent huge pages on a Linux CPU."""

import os
import re
from pathlib import Path

import torch

from paged_attn.kv_cache import PagedKVCache
from paged_attn.pools import HUGE_PAGE_BYTES, advise_huge_pages, empty_pool


def vm_flags_at(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        mapping = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if mapping:
            inside = int(mapping.group(1), 16) <= address < int(mapping.group(2), 16)
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_large_pool_is_advised_for_huge_pages():
    """Whether Linux can then find free huge pages depends on fragmentation; the advice itself
    shows as the mapping's "hg" flag."""
    pool = empty_pool((256, 16, 8, 128), torch.float32)  # 16 MiB
    assert pool.shape == (256, 16, 8, 128) and pool.dtype == torch.float32
    middle = pool.data_ptr() + pool.untyped_storage().nbytes() // 2
    assert "hg" in vm_flags_at(middle)
    pool.fill_(1.0)
    assert torch.equal(pool, torch.ones_like(pool))
    # A plain tensor is advised only when torch itself is asked to (THP_MEM_ALLOC_ENABLE=1).
    plain = torch.empty(16 << 20, dtype=torch.uint8)
    torch_advises = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    assert ("hg" in vm_flags_at(plain.data_ptr() + (8 << 20))) == torch_advises


def test_advice_needs_a_whole_huge_page_inside_the_tensor():
    assert not advise_huge_pages(torch.empty(1024))
    assert advise_huge_pages(torch.empty(4 * HUGE_PAGE_BYTES // 4))
    assert not advise_huge_pages(torch.empty(4 * HUGE_PAGE_BYTES // 4, device="meta"))


def test_paged_kv_cache_pools_start_zeroed_in_every_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
        cache = PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=600,
                             block_size=16, dtype=dtype)
        for layer in cache.layers:
            for pool in (layer.key_cache, layer.value_cache):
                assert pool.dtype == dtype
                assert not pool.float().any()
