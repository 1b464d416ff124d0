"""Continuous batching: admit waiting sequences when their blocks fit, decode the rest, preempt when full.

Each engine step is either a prefill of newly admitted sequences or one decode step of every
running sequence, so requests join between decode steps. Admission asks the block manager for
the slots a sequence holds right after its (possibly compressed) prefill, plus one block of headroom
for every sequence already running: without it, admission fills the pool to the last block, the next
decode step that needs a block preempts the newest sequence, whose freed blocks admit it again at
once, and the engine spends its time re-prefilling the same prompt. With ``admission`` (length-aware,
:mod:`kvslim.engine.admission`) the headroom is instead every sequence's expected remaining growth. When a decode step finds
no free block for some sequence, the most recently admitted sequence is preempted *by recompute*:
its blocks are freed and it goes back to the front of the queue, to be prefilled again (prompt
and output so far) when memory frees up. A request that could not run even alone is refused when
it is added, so the engine never runs out of memory and never waits forever.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from .admission import LengthAwareAdmission
from .block_manager import BlockManager
from .compression import Compression
from .sequence import Sequence, Status


class RequestTooLarge(ValueError):
    """The request needs more KV blocks (or positions) than the engine has, even running alone."""


@dataclass
class Metrics:
    waiting: int
    running: int
    blocks_used: int
    blocks_free: int
    preemptions: int
    tier: dict | None = None  # the KV tier's counters (see kvslim.cache.tier.TierStats), when there is one


class Scheduler:
    def __init__(self, blocks: BlockManager, compression: Compression, max_num_seqs: int, max_prefill_tokens: int,
                 max_model_len: int, grows: Callable[[Sequence], bool] = lambda seq: True,
                 admission: LengthAwareAdmission | None = None):
        """``grows(seq)``: whether the sequence's next decode step writes a new page slot (quantized pages
        write one only when a residual unit is packed). ``admission``: length-aware headroom; None keeps a block
        per running sequence."""
        self.blocks, self.compression, self.grows, self.admission = blocks, compression, grows, admission
        self.max_num_seqs, self.max_prefill_tokens, self.max_model_len = max_num_seqs, max_prefill_tokens, max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def check(self, n_prompt: int, max_tokens: int, n: int = 1) -> None:
        """Raise :class:`RequestTooLarge` if a request of this size cannot run even with the whole pool.

        The ``n`` completions of a prompt are forked together right after its prefill, so they must fit
        in one batch (and, with a residual ring, in its rows) at the same time: a larger ``n`` would wait
        for admission forever and hold up every request queued behind it.
        """
        if n > self.max_num_seqs:
            ring = f" (one row of the residual ring each; the ring has {self.blocks.rows})" if self.blocks.rows else ""
            raise RequestTooLarge(
                f"n={n} completions are decoded at once{ring}, but the engine decodes at most {self.max_num_seqs} "
                "sequences at once: ask for fewer completions, or raise max_num_seqs (and kv_memory)"
            )
        total = n_prompt + max_tokens
        if total > self.max_model_len:
            raise RequestTooLarge(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {total} exceeds the model's "
                f"maximum context of {self.max_model_len} tokens"
            )
        need = self.blocks.blocks_for(self.compression.reserve(n_prompt) + max_tokens)
        if need > self.blocks.num_blocks:
            raise RequestTooLarge(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) needs {need} KV blocks of "
                f"{self.blocks.block_size} tokens but the whole pool has {self.blocks.num_blocks}: "
                "shorten the request or give the engine more kv_memory"
            )

    def add(self, seq: Sequence) -> None:
        self.check(seq.num_prompt_tokens, seq.params.max_tokens, seq.params.n)
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def metrics(self) -> Metrics:
        return Metrics(len(self.waiting), len(self.running), self.blocks.num_used, self.blocks.num_free, self.preemptions)

    def schedule(self) -> tuple[list[Sequence], bool, list[tuple[int, int]]]:
        """The sequences of the next step, whether it is a prefill step, and the block copies a decode step needs first.

        For a decode step every sequence's next slot is made writable here (a new block, or a copy of
        a shared one), so the blocks are taken before the next sequence is looked at.
        """
        admitted: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            slots = self.compression.reserve(len(seq))
            if admitted and tokens + len(seq) > self.max_prefill_tokens:
                break
            rows = 1 if seq.output_token_ids else seq.params.n  # forks of a fresh prompt take ring rows too
            if self.admission is None:
                headroom = len(self.running) * self.blocks.block_size  # a block of growth per running sequence
            else:
                headroom = self.admission.headroom(seq, slots, self.running)
            if not self.blocks.can_allocate(slots + headroom, rows):
                break
            self.blocks.allocate(seq, slots, self.compression.shareable(len(seq)))
            seq.status = Status.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            admitted.append(seq)
            tokens += len(seq)
        if admitted:
            return admitted, True, []
        batch: list[Sequence] = []
        copies: list[tuple[int, int]] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for an earlier one
                continue
            if not self.grows(seq):
                batch.append(seq)
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                copies += self.blocks.append_slot(seq)
                batch.append(seq)
        return batch, False, copies

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it will be prefilled again from its tokens so far."""
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.reset_kv()
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence done (or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if self.admission is not None:
            self.admission.completed(seq, reason)
