"""Block-sharing scenarios of the memory simulation (bench/memory.py): parallel sampling, beam
search and a shared system prompt, each run on the real BlockAllocator with and without
sharing (fork + copy-on-write, prefix caching), counting used blocks per decode step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from paged_attn.allocator import BlockAllocator, BlockTable

SYSTEM_PROMPT_TOKENS = 341
SHARING_WIDTH = 4


def prompt_table(allocator: BlockAllocator, prompt_len: int) -> BlockTable:
    table = BlockTable(allocator)
    table.append(num_tokens=prompt_len)
    return table


def private_copy(table: BlockTable) -> BlockTable:
    """What a system without sharing does instead of a fork: copy every token."""
    return prompt_table(table.allocator, table.num_tokens)


def parallel_sampling(allocator, lengths, share, rng) -> Iterator[int]:
    """n samples per prompt; each sample appends one token per step. Yields blocks copied."""
    for prompt_len, output_len in lengths:
        first = prompt_table(allocator, prompt_len)
        clone = BlockTable.fork if share else private_copy
        samples = [first] + [clone(first) for _ in range(SHARING_WIDTH - 1)]
        for _ in range(output_len):
            yield sum(len(sample.append(num_tokens=1).block_copies) for sample in samples)
        for sample in samples:
            sample.free()


def beam_search(allocator, lengths, share, rng) -> Iterator[int]:
    """Each step the width best candidates pick their parent beams uniformly at random.

    A beam with several children is forked; one that no candidate chose is freed.
    Uniform parents are a modelling assumption. Without sharing, every beam holds
    a private copy of its whole history whichever parent it descends from, which
    takes the memory of `width` independent samples.
    """
    if not share:
        yield from parallel_sampling(allocator, lengths, share, rng)
        return
    for prompt_len, output_len in lengths:
        first = prompt_table(allocator, prompt_len)
        beams = [first] + [first.fork() for _ in range(SHARING_WIDTH - 1)]
        for _ in range(output_len):
            parents = rng.integers(0, SHARING_WIDTH, SHARING_WIDTH)
            children = [beams[parent].fork() for parent in parents]
            for beam in beams:
                beam.free()
            beams = children
            yield sum(len(beam.append(num_tokens=1).block_copies) for beam in beams)
        for beam in beams:
            beam.free()


def shared_system_prompt(allocator, lengths, share, rng) -> Iterator[int]:
    """All requests start together, each prompt = one system prompt + its own user prompt."""
    system_prompt = rng.integers(0, 32000, SYSTEM_PROMPT_TOKENS).tolist()
    running = []
    for prompt_len, output_len in lengths:
        prompt = system_prompt + rng.integers(32000, 64000, prompt_len).tolist()
        table = BlockTable(allocator)
        num_cached = table.reuse_cached_prefix(prompt) if share else 0
        table.append(token_ids=prompt[num_cached:])
        running.append((table, output_len))
    for step in range(max(output_len for _, output_len in running) + 1):
        for table, output_len in running:
            if step < output_len:
                table.append(num_tokens=1)
            elif step == output_len:
                table.free()
        yield 0


def count_block_steps(scenario, lengths, block_size: int, share: bool, seed: int):
    """Run one scenario on a fresh allocator: used blocks summed over steps, blocks copied,
    prefix-cache hit rate."""
    longest = max(prompt + output for prompt, output in lengths) + SYSTEM_PROMPT_TOKENS
    pool = 2 * SHARING_WIDTH * len(lengths) * (longest // block_size + 2)
    allocator = BlockAllocator(pool, block_size, enable_prefix_caching=share)
    block_steps = copies = 0
    for blocks_copied in scenario(allocator, lengths, share, np.random.default_rng(seed)):
        block_steps += allocator.num_used_blocks
        copies += blocks_copied
    if allocator.num_used_blocks:
        raise AssertionError(f"{scenario.__name__} leaked {allocator.num_used_blocks} blocks")
    return block_steps, copies, allocator.stats.hit_rate


def sharing_saving(scenario, lengths, block_size: int, seed: int) -> dict:
    """Block-steps with and without sharing, both on the real allocator."""
    unshared, _, _ = count_block_steps(scenario, lengths, block_size, False, seed)
    shared, copies, hit_rate = count_block_steps(scenario, lengths, block_size, True, seed)
    return {
        "saving_pct": 100.0 * (1.0 - shared / unshared),
        "block_steps_shared": shared,
        "block_steps_unshared": unshared,
        "copy_on_write_blocks": copies,
        "prefix_hit_rate": hit_rate,
    }


SHARING_SCENARIOS = {
    "parallel sampling (n=4)": parallel_sampling,
    "beam search (width 4)": beam_search,
    f"shared {SYSTEM_PROMPT_TOKENS}-token system prompt": shared_system_prompt,
}
