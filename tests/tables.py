"""Helpers shared by the block-table tests (test_allocator.py, test_prefix_cache.py)."""

from paged_attn.allocator import BlockTable


def filled_table(allocator, token_ids):
    """A new table of `allocator` holding `token_ids`, appended with their ids."""
    table = BlockTable(allocator)
    table.append(token_ids=token_ids)
    return table
