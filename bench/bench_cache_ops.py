"""The cache ops on the CPU against memcpy: write_kv, copy_blocks and swap_blocks in GB/s, each
next to a torch `copy_` of the same number of bytes, timed in the same run.

    python bench/bench_cache_ops.py            # about a minute on 2 cores
    python bench/bench_cache_ops.py --quick

GB/s counts the payload an op moves (each byte read once and written once), the same for its
memcpy. Before every timed call a 1 GiB streaming read evicts the caches (it is also a sample of
the read bandwidth); each op alternates with its memcpy; medians of the repeats are reported.
"""

import argparse
import sys
from dataclasses import dataclass

import torch

import common

RESULTS_NAME = "cache_ops.json"
TARGET_SHARE_OF_MEMCPY = 70  # percent, issue #6


@dataclass
class CacheOpCase:
    name: str
    detail: str
    payload_bytes: int
    run: object          # () -> None: our op
    memcpy: object       # () -> None: torch copy_ of payload_bytes
    has_target: bool = True


def write_kv_case(dtype: torch.dtype, cache_dtype: torch.dtype, tokens: int) -> CacheOpCase:
    """A prefill chunk: `tokens` new tokens stored into shuffled blocks of a paged cache."""
    import paged_attn

    block_size, heads, head_size = 16, 8, 128
    key = torch.randn(tokens, heads, head_size).to(dtype)
    value = torch.randn(tokens, heads, head_size).to(dtype)
    num_blocks = tokens // block_size
    key_cache = torch.zeros(num_blocks, block_size, heads, head_size, dtype=cache_dtype)
    value_cache = torch.zeros_like(key_cache)
    blocks = torch.randperm(num_blocks)
    slots = (blocks[:, None] * block_size + torch.arange(block_size)[None, :]).flatten()
    scales = {}
    if cache_dtype == torch.float8_e4m3fn:
        scales = {"k_scale": torch.tensor([0.05]), "v_scale": torch.tensor([0.05])}
    copy_sources = [key.clone(), value.clone()]
    copy_targets = [torch.empty_like(key), torch.empty_like(value)]

    def memcpy():
        for target, source in zip(copy_targets, copy_sources):
            target.copy_(source)

    quantizing = cache_dtype != dtype
    return CacheOpCase(
        "write_kv", f"{tokens} tokens x {heads} heads x {head_size}, {str(dtype)[6:]}"
        + (f" -> {str(cache_dtype)[6:]} (quantizes; no target)" if quantizing else ""),
        2 * key.numel() * key.element_size(),
        lambda: paged_attn.write_kv(key, value, key_cache, value_cache, slots, **scales),
        memcpy, has_target=not quantizing)


def copy_blocks_case(layers: int, pairs: int) -> CacheOpCase:
    """Copy-on-write of `pairs` blocks in every layer's K and V cache."""
    import paged_attn

    shape = (2 * pairs, 16, 8, 128)
    key_caches = [torch.randn(shape).to(torch.bfloat16) for _ in range(layers)]
    value_caches = [torch.randn(shape).to(torch.bfloat16) for _ in range(layers)]
    order = torch.randperm(2 * pairs)
    mapping = torch.stack([order[:pairs], order[pairs:]], dim=1)
    block_bytes = key_caches[0][0].numel() * 2
    payload = 2 * layers * pairs * block_bytes
    source, target = torch.empty(payload, dtype=torch.uint8), torch.empty(payload, dtype=torch.uint8)
    return CacheOpCase(
        "copy_blocks", f"{layers} layers x {pairs} scattered blocks of {block_bytes // 1024} KiB, K and V",
        payload, lambda: paged_attn.copy_blocks(key_caches, value_caches, mapping),
        lambda: target.copy_(source))


def swap_blocks_case(num_blocks: int, contiguous: bool) -> CacheOpCase:
    """Swap-out of `num_blocks` blocks into a second (CPU) pool."""
    import paged_attn

    src = torch.randn(num_blocks, 16, 8, 128).to(torch.bfloat16)
    dst = torch.empty_like(src)
    destination = torch.arange(num_blocks) if contiguous else torch.randperm(num_blocks)
    mapping = torch.stack([torch.arange(num_blocks), destination], dim=1)
    payload = src.numel() * 2
    source, target = src.clone(), torch.empty_like(src)
    return CacheOpCase(
        "swap_blocks", f"{num_blocks} blocks of 32 KiB, " + ("one contiguous run" if contiguous
                                                           else "scattered destinations"),
        payload, lambda: paged_attn.swap_blocks(src, dst, mapping), lambda: target.copy_(source))


def cases(quick: bool):
    scale = 1 if quick else 4
    yield lambda: write_kv_case(torch.bfloat16, torch.bfloat16, 8192 * scale)
    yield lambda: write_kv_case(torch.float32, torch.float32, 8192 * scale)
    yield lambda: write_kv_case(torch.bfloat16, torch.float8_e4m3fn, 8192 * scale)
    yield lambda: copy_blocks_case(layers=2 * scale, pairs=512)
    yield lambda: swap_blocks_case(2048 * scale, contiguous=True)
    yield lambda: swap_blocks_case(2048 * scale, contiguous=False)


def measure(case: CacheOpCase, probe: common.BandwidthProbe, repeats: int) -> dict:
    for _ in range(2):
        case.run()
        case.memcpy()
    times = {"ours": [], "memcpy": []}
    for repeat in range(repeats):
        order = ("ours", "memcpy") if repeat % 2 == 0 else ("memcpy", "ours")
        for name in order:
            probe.sample(repeats=1)  # also evicts the caches
            times[name].append(common.time_call(case.run if name == "ours" else case.memcpy))
    median_ms = {name: 1e3 * sorted(t)[len(t) // 2] for name, t in times.items()}
    gbps = {name: case.payload_bytes / (ms / 1e3) / 1e9 for name, ms in median_ms.items()}
    return {"op": case.name, "detail": case.detail, "payload_bytes": case.payload_bytes,
            "median_ms": median_ms, "gbps": gbps, "has_target": case.has_target,
            "percent_of_memcpy": 100 * gbps["ours"] / gbps["memcpy"]}


def table_rows(results: list[dict]) -> tuple[list[str], list[list]]:
    headers = ["op", "what", "MiB", "ours ms", "ours GB/s", "memcpy ms", "memcpy GB/s", "ours / memcpy"]
    rows = [[r["op"], r["detail"], f"{r['payload_bytes'] / 2**20:.0f}", f"{r['median_ms']['ours']:.2f}",
             f"{r['gbps']['ours']:.1f}", f"{r['median_ms']['memcpy']:.2f}", f"{r['gbps']['memcpy']:.1f}",
             f"{r['percent_of_memcpy']:.0f}%"] for r in results]
    return headers, rows


def done_criteria(results: list[dict]) -> list[str]:
    lines = []
    for op in ("write_kv", "copy_blocks", "swap_blocks"):
        shares = [r["percent_of_memcpy"] for r in results if r["op"] == op and r["has_target"]]
        if shares:
            lines.append(f"{op}: {min(shares):.0f}%-{max(shares):.0f}% of memcpy (target >= "
                         f"{TARGET_SHARE_OF_MEMCPY}%): "
                         f"{'met' if min(shares) >= TARGET_SHARE_OF_MEMCPY else 'NOT met'}")
    return lines


def cache_section(data: dict) -> list[str]:
    """The cache-ops part of README_perf.md, rendered from cache_ops.json."""
    headers, rows = table_rows(data["results"])
    return [
        "### Cache ops (`bench/bench_cache_ops.py`)",
        "",
        f"GB/s of payload (bytes each op copies), median of {data['repeats']} cold-cache calls, "
        f"next to a torch `copy_` of the same bytes in the same run "
        f"(read bandwidth in that run: {data['bandwidth']['best_gbps']:.1f} GB/s).",
        "",
        *[f"- {line}" for line in done_criteria(data["results"])],
        "",
        common.markdown_table(headers, rows),
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller payloads, fewer repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 7)
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    probe = common.BandwidthProbe()
    results = []
    for make_case in tqdm(list(cases(args.quick)), desc="cache ops", unit="case"):
        results.append(measure(make_case(), probe, args.repeats))
    criteria = done_criteria(results)
    headers, rows = table_rows(results)
    print(common.text_table(headers, rows))
    print("\n" + "\n".join(criteria))
    payload = {"machine": common.machine(), "repeats": args.repeats, "quick": args.quick,
               "bandwidth": probe.summary(), "done_criteria": criteria, "results": results}
    print(f"\nwrote {common.save_json(RESULTS_NAME, payload)} and {common.render_perf_readme()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
