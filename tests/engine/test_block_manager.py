"""Random allocate / fork / append / drop / trim / preempt / free sequences never leak, double-free or miscount."""
from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvslim.engine.block_manager import BlockManager
from kvslim.engine.sampling_params import SamplingParams
from kvslim.engine.sequence import Sequence

BLOCK = 4


class BlockMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.manager = BlockManager(num_blocks=24, block_size=BLOCK)
        self.live: list[Sequence] = []

    @rule(length=st.integers(1, 30), vocab=st.integers(1, 3), cache=st.booleans())
    def allocate(self, length: int, vocab: int, cache: bool) -> None:
        seq = Sequence([i % vocab for i in range(length)], SamplingParams())  # small vocab: prefixes repeat
        if self.manager.can_allocate(length):
            self.manager.allocate(seq, length, length if cache else 0)
            seq.kv_slots = length
            assert seq.num_cached_tokens <= length
            self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(self.live))
        child = parent.fork()
        self.manager.fork(parent, child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def append(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        if self.manager.can_append(seq):
            before = list(seq.block_table)
            copies = self.manager.append_slot(seq)
            index = seq.kv_slots // BLOCK
            assert self.manager.ref_counts[seq.block_table[index]] == 1  # the slot written is private
            assert all(src == before[index] for src, _ in copies)
            seq.kv_slots += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def drop_passed_block(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        full = seq.kv_slots // BLOCK
        if full > 1:
            self.manager.drop(seq, data.draw(st.integers(0, full - 2)))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def trim(self, data: st.DataObject) -> None:
        """As after a compressed prefill: before any block was dropped."""
        seq = data.draw(st.sampled_from([s for s in self.live if -1 not in s.block_table] or self.live))
        if -1 in seq.block_table:
            return
        seq.kv_slots = data.draw(st.integers(0, seq.kv_slots))
        self.manager.trim(seq, seq.kv_slots)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), preempt=st.booleans())
    def free(self, data: st.DataObject, preempt: bool) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.manager.free_seq(seq)
        self.live.remove(seq)
        if preempt:
            seq.reset_kv()
            assert seq.block_table == [] and seq.kv_slots == 0

    @invariant()
    def refcounts_are_exact(self) -> None:
        held = Counter(b for seq in self.live for b in seq.block_table if b >= 0)
        free = list(self.manager.free)
        assert len(free) == len(set(free)), "a block is on the free list twice"
        for block in range(self.manager.num_blocks):
            assert self.manager.ref_counts[block] == held[block]
            assert (block in set(free)) == (held[block] == 0), f"block {block} leaked or freed while held"

    def teardown(self) -> None:
        for seq in self.live:
            self.manager.free_seq(seq)
        assert self.manager.num_free == self.manager.num_blocks


TestBlockManager = BlockMachine.TestCase
TestBlockManager.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_prefix_hit_and_copy_on_write() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    a, b = Sequence(list(range(10)), SamplingParams()), Sequence(list(range(9)) + [99], SamplingParams())
    manager.allocate(a, 10, 10)
    manager.allocate(b, 10, 10)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    child = a.fork()
    manager.fork(a, child)
    child.kv_slots = a.kv_slots = 10
    copies = manager.append_slot(child)  # slot 10 lies in the shared third block
    assert copies == [(a.block_table[2], child.block_table[2])]
    assert manager.ref_counts[a.block_table[2]] == 1


def test_double_free_is_detected() -> None:
    manager = BlockManager(num_blocks=2, block_size=BLOCK)
    seq = Sequence([1, 2, 3], SamplingParams())
    manager.allocate(seq, 3)
    table = list(seq.block_table)
    manager.free_seq(seq)
    seq.block_table = table
    with pytest.raises(RuntimeError, match="freed twice"):
        manager.free_seq(seq)


def test_reset_prefix_cache_forgets_prefixes_between_requests() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    a, b, c = (Sequence(list(range(10)), SamplingParams()) for _ in range(3))
    manager.allocate(a, 10, 10)
    with pytest.raises(RuntimeError, match="blocks in use"):
        manager.reset_prefix_cache()
    manager.free_seq(a)
    manager.allocate(b, 10, 10)
    assert b.num_cached_tokens == 8  # a's freed blocks still hold its prefix
    manager.free_seq(b)
    manager.reset_prefix_cache()
    manager.allocate(c, 10, 10)
    assert c.num_cached_tokens == 0 and manager.num_free == 5


def test_unregistered_blocks_become_findable_as_they_are_registered_and_forgotten_again() -> None:
    manager = BlockManager(num_blocks=12, block_size=BLOCK)
    tokens = list(range(1, 14))  # 3 full blocks and one partial
    first = Sequence(tokens, SamplingParams())
    manager.allocate(first, len(tokens), len(tokens), register=False)
    assert manager.prefix_hashes(first) == []
    manager.register(first, 9)  # the first two blocks are written
    assert manager.prefix_hashes(first) == manager.chain_hashes(tokens, 8)
    second = Sequence(tokens, SamplingParams())
    manager.allocate(second, len(tokens), len(tokens))
    assert second.num_cached_tokens == 8 and second.block_table[:2] == first.block_table[:2]
    manager.forget(first, 4)  # a failed step: the second block may be unwritten
    assert len(manager.prefix_hashes(first)) == 1
    third = Sequence(tokens, SamplingParams())
    manager.allocate(third, len(tokens), len(tokens))
    assert third.num_cached_tokens == 4
