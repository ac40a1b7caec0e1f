"""paged_attn.pools: KV pools backed by transparent huge pages on a Linux CPU."""

import re
from pathlib import Path

import torch

from paged_attn.kv_cache import PagedKVCache
from paged_attn.pools import HUGE_PAGE_BYTES, advise_huge_pages, empty_pool


def anon_huge_kib() -> int:
    text = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"AnonHugePages:\s+(\d+) kB", text).group(1))


def thp_mode() -> str:
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    return re.search(r"\[(\w+)\]", text).group(1)


def test_large_pool_is_backed_by_huge_pages_once_touched():
    before = anon_huge_kib()
    pool = empty_pool((256, 16, 8, 128), torch.float32)  # 16 MiB
    assert pool.shape == (256, 16, 8, 128) and pool.dtype == torch.float32
    pool.fill_(1.0)
    gained = anon_huge_kib() - before
    if thp_mode() == "never":
        assert gained == 0  # the advice is only a hint
    else:
        # All whole 2 MiB pages inside the 16 MiB tensor: at least 7 of them.
        assert gained >= 7 * HUGE_PAGE_BYTES // 1024, gained
    assert torch.equal(pool, torch.ones_like(pool))


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
