"""Tests of the block allocator and block tables (paged_attn/allocator.py).

Unit tests pin each documented behaviour; a hypothesis state machine then runs
random mixes of every operation against a model of the KV memory and checks
that blocks are conserved, shared only through references, and never leak.
"""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from paged_attn.allocator import NO_BLOCK, BlockAllocator, BlockTable, OutOfBlocksError
from tables import filled_table


def allocator_state(allocator):
    """Everything observable about an allocator, to compare before and after a call."""
    return (
        allocator.num_free_blocks,
        allocator.num_used_blocks,
        allocator.num_cached_blocks,
        [allocator.refcount(block_id) for block_id in range(allocator.num_blocks)],
        allocator.stats,
    )


def table_state(table):
    return table.block_ids, table.num_tokens, table.allocator


# BlockAllocator ---------------------------------------------------------------


def test_allocate_hands_out_distinct_blocks_and_counts_them():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    blocks = allocator.allocate(3) + allocator.allocate(2)
    assert len(set(blocks)) == 5
    assert all(allocator.refcount(block_id) == 1 for block_id in blocks)
    assert (allocator.num_used_blocks, allocator.num_free_blocks) == (5, 3)
    assert allocator.can_allocate(3) and not allocator.can_allocate(4)


def test_out_of_blocks_raises_and_changes_nothing():
    allocator = BlockAllocator(num_blocks=4, block_size=4)
    allocator.allocate(3)
    before = allocator_state(allocator)
    with pytest.raises(OutOfBlocksError):
        allocator.allocate(2)
    assert allocator_state(allocator) == before
    assert issubclass(OutOfBlocksError, RuntimeError)


def test_free_returns_block_only_after_the_last_reference():
    allocator = BlockAllocator(num_blocks=2, block_size=4)
    (block_id,) = allocator.allocate(1)
    assert allocator.fork(block_id) == block_id
    assert allocator.refcount(block_id) == 2
    allocator.free(block_id)
    assert allocator.num_used_blocks == 1
    allocator.free(block_id)
    assert (allocator.num_used_blocks, allocator.num_free_blocks) == (0, 2)


def test_double_free_raises_value_error():
    allocator = BlockAllocator(num_blocks=2, block_size=4)
    (block_id,) = allocator.allocate(1)
    allocator.free(block_id)
    with pytest.raises(ValueError, match="reference count is already 0"):
        allocator.free(block_id)
    with pytest.raises(ValueError, match="reference count is already 0"):
        allocator.fork(block_id)
    assert allocator.num_free_blocks == 2


@pytest.mark.parametrize("block_id", [-1, 2, 100])
def test_out_of_range_block_id_raises_value_error(block_id):
    allocator = BlockAllocator(num_blocks=2, block_size=4)
    for operation in (allocator.free, allocator.fork, allocator.refcount):
        with pytest.raises(ValueError, match="out of range"):
            operation(block_id)


def test_invalid_sizes_are_rejected():
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks=0, block_size=4)
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks=4, block_size=0)
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks=4, block_size=4).allocate(-1)


# Slot mapping --------------------------------------------------------------------


def test_append_maps_tokens_to_block_slots_across_block_boundaries():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    table = BlockTable(allocator)
    first = table.append(num_tokens=6)
    second = table.append(num_tokens=3)
    block_a, block_b, block_c = table.block_ids
    expected = [block_a * 4 + offset for offset in range(4)]
    expected += [block_b * 4 + offset for offset in range(4)] + [block_c * 4]
    assert first.slot_mapping + second.slot_mapping == expected
    assert first.block_copies == second.block_copies == []
    assert table.num_tokens == 9
    assert table.block_table_row(5) == [block_a, block_b, block_c, NO_BLOCK, NO_BLOCK]
    with pytest.raises(ValueError, match="width 2"):
        table.block_table_row(2)


def test_append_takes_exactly_one_of_num_tokens_and_token_ids():
    table = BlockTable(BlockAllocator(num_blocks=2, block_size=4))
    with pytest.raises(ValueError, match="exactly one"):
        table.append()
    with pytest.raises(ValueError, match="exactly one"):
        table.append(num_tokens=1, token_ids=[1])
    with pytest.raises(ValueError, match="negative"):
        table.append(num_tokens=-1)
    assert table.append(num_tokens=0) == ([], [])
    assert table.allocator.num_used_blocks == 0


def test_append_out_of_blocks_changes_nothing():
    allocator = BlockAllocator(num_blocks=3, block_size=4)
    table = filled_table(allocator, [1, 2, 3, 4, 5])
    before = allocator_state(allocator), table_state(table)
    with pytest.raises(OutOfBlocksError):
        table.append(num_tokens=8)
    assert (allocator_state(allocator), table_state(table)) == before


# Fork and copy-on-write ----------------------------------------------------------


def test_copy_on_write_gives_the_appender_a_private_copy():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    parent = filled_table(allocator, [1, 2, 3, 4, 5, 6])
    full_block, partial_block = parent.block_ids
    child = parent.fork()
    assert allocator.refcount(full_block) == allocator.refcount(partial_block) == 2

    slots, copies = child.append(token_ids=[7])
    private_block = child.block_ids[1]
    assert copies == [(partial_block, private_block)]
    assert private_block not in (full_block, partial_block)
    assert slots == [private_block * 4 + 2]
    assert parent.block_ids == [full_block, partial_block]
    assert child.block_ids == [full_block, private_block]
    assert allocator.refcount(partial_block) == allocator.refcount(private_block) == 1

    slots, copies = parent.append(token_ids=[8])
    assert copies == [] and slots == [partial_block * 4 + 2]


def test_no_copy_when_the_shared_last_block_is_full():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    parent = filled_table(allocator, [1, 2, 3, 4])
    child = parent.fork()
    slots, copies = child.append(num_tokens=1)
    assert copies == []
    assert child.block_ids[0] == parent.block_ids[0]
    assert slots == [child.block_ids[1] * 4]


def test_copy_on_write_out_of_blocks_changes_nothing():
    allocator = BlockAllocator(num_blocks=2, block_size=4)
    parent = filled_table(allocator, [1, 2, 3, 4, 5])
    child = parent.fork()
    before = allocator_state(allocator), table_state(parent), table_state(child)
    with pytest.raises(OutOfBlocksError):
        child.append(num_tokens=1)
    assert (allocator_state(allocator), table_state(parent), table_state(child)) == before


def test_forked_tables_free_every_block_between_them():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    parent = filled_table(allocator, range(6))
    children = [parent.fork() for _ in range(3)]
    for child in children:
        child.append(num_tokens=3)
    parent.free()
    assert parent.num_tokens == 0 and parent.block_ids == []
    for child in children:
        child.free()
    assert allocator.num_used_blocks == 0
    assert allocator.num_free_blocks == 8


# Sliding window ----------------------------------------------------------------------


def test_release_blocks_before_keeps_positions():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    table = filled_table(allocator, range(10))
    block_a, block_b, block_c = table.block_ids
    table.release_blocks_before(7)
    assert table.block_ids == [NO_BLOCK, block_b, block_c]
    assert allocator.refcount(block_b) == 1 and allocator.num_used_blocks == 2
    table.release_blocks_before(3)
    assert allocator.num_used_blocks == 2
    slots, _ = table.append(num_tokens=3)
    assert slots == [block_c * 4 + 2, block_c * 4 + 3, table.block_ids[3] * 4]
    assert table.block_table_row(5)[:2] == [NO_BLOCK, block_b]
    with pytest.raises(ValueError, match="outside"):
        table.release_blocks_before(14)
    table.free()
    assert allocator.num_used_blocks == 0


def test_released_blocks_are_not_shared_by_a_fork():
    allocator = BlockAllocator(num_blocks=8, block_size=2)
    table = filled_table(allocator, range(5))
    table.release_blocks_before(4)
    child = table.fork()
    assert child.block_ids == table.block_ids
    assert allocator.num_used_blocks == 1
    assert allocator.refcount(table.block_ids[2]) == 2


# Swapping ---------------------------------------------------------------------------


def test_swap_out_and_in_round_trip():
    gpu = BlockAllocator(num_blocks=6, block_size=4)
    cpu = BlockAllocator(num_blocks=4, block_size=4)
    table = filled_table(gpu, range(6))
    gpu_blocks = table.block_ids

    to_cpu = table.swap_out(cpu)
    cpu_blocks = table.block_ids
    assert to_cpu == list(zip(gpu_blocks, cpu_blocks, strict=True))
    assert table.allocator is cpu and table.num_tokens == 6
    assert (gpu.num_used_blocks, cpu.num_used_blocks) == (0, 2)

    to_gpu = table.swap_in(gpu)
    assert to_gpu == list(zip(cpu_blocks, table.block_ids, strict=True))
    assert table.allocator is gpu
    assert (gpu.num_used_blocks, cpu.num_used_blocks) == (2, 0)
    slots, _ = table.append(num_tokens=1)
    assert slots == [table.block_ids[1] * 4 + 2]


def test_swap_out_of_blocks_changes_nothing():
    gpu = BlockAllocator(num_blocks=6, block_size=4)
    cpu = BlockAllocator(num_blocks=1, block_size=4)
    table = filled_table(gpu, range(6))
    before = allocator_state(gpu), allocator_state(cpu), table_state(table)
    with pytest.raises(OutOfBlocksError):
        table.swap_out(cpu)
    assert (allocator_state(gpu), allocator_state(cpu), table_state(table)) == before


def test_swap_rejects_the_same_allocator_and_other_block_sizes():
    gpu = BlockAllocator(num_blocks=4, block_size=4)
    table = filled_table(gpu, range(3))
    with pytest.raises(ValueError, match="already"):
        table.swap_in(gpu)
    with pytest.raises(ValueError, match="block sizes differ"):
        table.swap_out(BlockAllocator(num_blocks=4, block_size=8))


# Property tests ---------------------------------------------------------------------

BLOCK_SIZE = 3
# Prompts come from two token ids, so they often share cached prefixes; generated
# tokens from many, so a token read back from the wrong slot rarely matches by chance.
prompts = st.lists(st.integers(0, 1), min_size=1, max_size=8)
generated_tokens = st.lists(st.integers(2, 999), min_size=1, max_size=5)


class ModelSequence:
    """A sequence as the model sees it: its block table and the tokens it should hold."""

    def __init__(self, table, token_ids, num_released_tokens=0):
        self.table = table
        self.token_ids = list(token_ids)
        self.num_released_tokens = num_released_tokens


class AllocatorMachine(RuleBasedStateMachine):
    """Random workloads against a model of the cache memory: slot -> token written there.

    The engine's side of each operation is played here: block copies are done
    before writes, swaps copy whole blocks. If the allocator ever lets two
    sequences write one slot without sharing, or reuses a block still in use,
    some sequence reads back a wrong token.
    """

    def __init__(self):
        super().__init__()
        self.gpu = BlockAllocator(num_blocks=16, block_size=BLOCK_SIZE, enable_prefix_caching=True)
        self.cpu = BlockAllocator(num_blocks=6, block_size=BLOCK_SIZE)
        self.memory = {self.gpu: {}, self.cpu: {}}
        self.sequences = []

    def state(self):
        return (
            allocator_state(self.gpu),
            allocator_state(self.cpu),
            [table_state(sequence.table) for sequence in self.sequences],
        )

    def copy_block(self, source, destination, source_block, destination_block):
        for offset in range(BLOCK_SIZE):
            source_slot = source_block * BLOCK_SIZE + offset
            if source_slot in self.memory[source]:
                self.memory[destination][destination_block * BLOCK_SIZE + offset] = self.memory[
                    source
                ][source_slot]

    def write(self, table, token_ids, count_only):
        before = self.state()
        try:
            if count_only:
                slots, copies = table.append(num_tokens=len(token_ids))
            else:
                slots, copies = table.append(token_ids=token_ids)
        except OutOfBlocksError:
            assert self.state() == before
            return False
        for source_block, destination_block in copies:
            self.copy_block(table.allocator, table.allocator, source_block, destination_block)
        for slot, token in zip(slots, token_ids, strict=True):
            self.memory[table.allocator][slot] = token
        return True

    def on(self, allocator):
        return [sequence for sequence in self.sequences if sequence.table.allocator is allocator]

    @rule(prompt=prompts, count_only=st.booleans())
    def start_sequence(self, prompt, count_only):
        table = BlockTable(self.gpu)
        num_cached = table.reuse_cached_prefix(prompt)
        assert 0 <= num_cached < len(prompt) and num_cached % BLOCK_SIZE == 0
        if self.write(table, prompt[num_cached:], count_only):
            self.sequences.append(ModelSequence(table, prompt))
        else:
            table.free()

    @precondition(lambda self: self.on(self.gpu))
    @rule(data=st.data(), token_ids=generated_tokens, count_only=st.booleans())
    def extend_sequence(self, data, token_ids, count_only):
        sequence = data.draw(st.sampled_from(self.on(self.gpu)))
        if self.write(sequence.table, token_ids, count_only):
            sequence.token_ids += token_ids

    @precondition(lambda self: self.on(self.gpu))
    @rule(data=st.data())
    def fork_sequence(self, data):
        parent = data.draw(st.sampled_from(self.on(self.gpu)))
        self.sequences.append(
            ModelSequence(parent.table.fork(), parent.token_ids, parent.num_released_tokens)
        )

    @precondition(lambda self: self.sequences)
    @rule(data=st.data())
    def free_sequence(self, data):
        sequence = data.draw(st.sampled_from(self.sequences))
        sequence.table.free()
        self.sequences.remove(sequence)

    @precondition(lambda self: self.on(self.gpu))
    @rule(data=st.data())
    def slide_window(self, data):
        sequence = data.draw(st.sampled_from(self.on(self.gpu)))
        position = data.draw(st.integers(0, sequence.table.num_tokens))
        sequence.table.release_blocks_before(position)
        released = position // BLOCK_SIZE * BLOCK_SIZE
        sequence.num_released_tokens = max(sequence.num_released_tokens, released)

    @precondition(lambda self: self.sequences)
    @rule(data=st.data())
    def swap_sequence(self, data):
        sequence = data.draw(st.sampled_from(self.sequences))
        source = sequence.table.allocator
        before = self.state()
        try:
            if source is self.gpu:
                destination, pairs = self.cpu, sequence.table.swap_out(self.cpu)
            else:
                destination, pairs = self.gpu, sequence.table.swap_in(self.gpu)
        except OutOfBlocksError:
            assert self.state() == before
            return
        for source_block, destination_block in pairs:
            self.copy_block(source, destination, source_block, destination_block)

    @invariant()
    def blocks_are_conserved(self):
        for allocator in (self.gpu, self.cpu):
            total = allocator.num_free_blocks + allocator.num_used_blocks
            assert total + allocator.num_cached_blocks == allocator.num_blocks

    @invariant()
    def refcount_equals_the_number_of_holders(self):
        for allocator in (self.gpu, self.cpu):
            holders = [0] * allocator.num_blocks
            for sequence in self.on(allocator):
                for block_id in sequence.table.block_ids:
                    if block_id != NO_BLOCK:
                        holders[block_id] += 1
            assert holders == [allocator.refcount(block) for block in range(allocator.num_blocks)]
            assert allocator.num_used_blocks == sum(1 for count in holders if count)

    @invariant()
    def every_live_token_reads_back_and_only_shared_slots_collide(self):
        owners_of_slot = {}
        for sequence in self.sequences:
            table, memory = sequence.table, self.memory[sequence.table.allocator]
            assert table.num_tokens == len(sequence.token_ids)
            for position in range(sequence.num_released_tokens, table.num_tokens):
                block_id = table.block_ids[position // BLOCK_SIZE]
                slot = block_id * BLOCK_SIZE + position % BLOCK_SIZE
                assert memory.get(slot) == sequence.token_ids[position]
                owners = owners_of_slot.setdefault((table.allocator, slot), set())
                owners.add(id(sequence))
                assert table.allocator.refcount(block_id) >= len(owners)

    def teardown(self):
        for sequence in self.sequences:
            sequence.table.free()
        for allocator in (self.gpu, self.cpu):
            assert allocator.num_used_blocks == 0
            assert allocator.num_free_blocks + allocator.num_cached_blocks == allocator.num_blocks


AllocatorMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, derandomize=True
)
TestAllocatorMachine = AllocatorMachine.TestCase
