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

**Chunked prefill** (``token_budget``, vLLM's ``max_num_batched_tokens``): a step runs every decoding
sequence's next token *and* prompt chunks, up to ``token_budget`` tokens in all, so a 32k-token prompt no
longer stalls the sequences decoding beside it. Decode tokens come first (each running sequence's one
token, never cut); what is left goes to the sequences part-way through their prompt, oldest first, then
to newly admitted ones; at least one prompt token runs each step even when decodes fill the budget. Every
prefilling sequence is older than the ones admitted after it, so each step's chunks go first to the oldest
unfinished prompt, and every prompt finishes. A chunk attends to its sequence's earlier chunks, read back
from its blocks.

A prompt longer than what the step has left is split: it takes the blocks for its whole prompt at
admission (an evictor compresses only after the last chunk, from the pages; see
:mod:`kvslim.engine.compression`), so a chunk never waits for memory. Other prompts run whole, compressed
before they are stored, as without chunking: those that fit in what is left, those whose uncompressed
keys the pool could never hold (so chunking refuses nothing the engine runs without it), and every prompt
of a policy whose pages are not in the model dtype (``chunkable=False``: quantized or offloaded pages would
give a chunk its earlier chunks' keys dequantized, not the keys a whole prefill attends to). A whole prompt
larger than what is left waits to be its step's only prefill.
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
class Step:
    """What one engine step runs."""

    decode: list[Sequence]  # sequences that decode one token each
    prefill: list[tuple[Sequence, int]]  # (sequence, most prompt tokens to run now: a chunk or the whole rest)
    copies: list[tuple[int, int]]  # block copies (copy-on-write) the decode needs first


@dataclass
class Metrics:
    waiting: int
    running: int
    blocks_used: int
    blocks_free: int
    preemptions: int
    tier: dict | None = None  # the KV tier's counters (see kvslim.cache.tier.TierStats), when there is one
    latency: dict | None = None  # TTFT and inter-token latency percentiles (see kvslim.engine.latency)


class Scheduler:
    def __init__(self, blocks: BlockManager, compression: Compression, max_num_seqs: int, max_prefill_tokens: int,
                 max_model_len: int, grows: Callable[[Sequence], bool] = lambda seq: True,
                 token_budget: int | None = None, chunkable: bool = True,
                 admission: LengthAwareAdmission | None = None):
        """``grows(seq)``: whether the sequence's next decode step writes a new page slot (quantized pages
        write one only when a residual unit is packed). ``token_budget``: tokens per step with chunked prefill
        (None: a step prefills whole prompts, up to ``max_prefill_tokens``, or decodes); ``chunkable``: whether
        prompts may be split (see the module docstring). ``admission``: length-aware headroom; None keeps a
        block per running sequence."""
        if token_budget is not None and token_budget < 1:
            raise ValueError(f"max_num_batched_tokens={token_budget}: give a positive number of tokens per step")
        self.blocks, self.compression, self.grows, self.admission = blocks, compression, grows, admission
        self.token_budget, self.chunkable = token_budget, chunkable
        self.max_num_seqs, self.max_prefill_tokens, self.max_model_len = max_num_seqs, max_prefill_tokens, max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def check(self, n_prompt: int, max_tokens: int, n: int = 1, suffix: int = 0) -> None:
        """Raise :class:`RequestTooLarge` if a request of this size (the prompt's last ``suffix`` tokens kept
        uncompressed) cannot run even with the whole pool.

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
        need = self.blocks.blocks_for(self.compression.reserve(n_prompt - suffix, suffix) + max_tokens)
        if need > self.blocks.num_blocks:
            raise RequestTooLarge(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) needs {need} KV blocks of "
                f"{self.blocks.block_size} tokens but the whole pool has {self.blocks.num_blocks}: "
                "shorten the request or give the engine more kv_memory"
            )

    def add(self, seq: Sequence) -> None:
        self.check(seq.num_prompt_tokens, seq.params.max_tokens, seq.params.n, seq.suffix_tokens)
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def metrics(self) -> Metrics:
        return Metrics(len(self.waiting), len(self.running), self.blocks.num_used, self.blocks.num_free, self.preemptions)

    def schedule(self) -> Step:
        """The next step: whole prompts or one decode step of every running sequence, or, with a token budget,
        decode tokens and prompt chunks together (see the module docstring).

        For a decode step every sequence's next slot is made writable here (a new block, or a copy of
        a shared one), so the blocks are taken before the next sequence is looked at.
        """
        if self.token_budget is not None:
            return self._schedule_budget(self.token_budget)
        admitted: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if admitted and tokens + len(seq) > self.max_prefill_tokens:
                break
            if not self._admit(seq, self._reserve(seq), register=True):
                break
            admitted.append(seq)
            tokens += len(seq)
        if admitted:
            return Step([], [(seq, len(seq)) for seq in admitted], [])
        decode, copies = self._decode()
        return Step(decode, [], copies)

    def _schedule_budget(self, budget: int) -> Step:
        decode, copies = self._decode()
        budget = max(budget - len(decode), 1)  # a prompt token runs every step, however many sequences decode
        prefill: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if seq.prefilling and budget > 0:
                count = min(self._remaining(seq), budget)
                prefill.append(self._chunk(seq, count))
                budget -= count
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            split = self._splits(seq, budget)
            if not split and prefill and len(seq) > budget:
                break  # a whole prompt larger than what is left waits to be a step's only prefill
            if not self._admit(seq, len(seq) if split else self._reserve(seq), register=False):
                break
            count = min(self._remaining(seq), budget) if split else self._remaining(seq)
            prefill.append(self._chunk(seq, count))
            budget -= count
        return Step(decode, prefill, copies)

    def _chunk(self, seq: Sequence, count: int) -> tuple[Sequence, int]:
        """A prefill of ``count`` tokens in this step; the blocks it fills become findable by prefix hash now, since
        the step writes them before any prompt admitted after this one reads them."""
        done = seq.prefill_len - self._remaining(seq)
        self.blocks.register(seq, min(done + count, self.compression.shareable(len(seq))))
        return seq, count

    def _splits(self, seq: Sequence, budget: int) -> bool:
        """Whether a waiting prompt runs in chunks: it is longer than ``budget``, the policy's pages allow it, and
        the pool can hold it uncompressed until its evictor runs (and then its output)."""
        if seq.suffix_tokens:  # its suffix runs after the compressed rest, in the same prefill
            return False
        peak = max(len(seq), self._reserve(seq) + seq.params.max_tokens)
        return self.chunkable and len(seq) > budget and self.blocks.blocks_for(peak) <= self.blocks.num_blocks

    def _reserve(self, seq: Sequence) -> int:
        """Page slots ``seq`` holds right after its prefill: its compressed tokens' share, then any suffix whole."""
        return self.compression.reserve(seq.compressed_len, len(seq) - seq.compressed_len)

    @staticmethod
    def _remaining(seq: Sequence) -> int:
        """Prompt tokens still to run (before its first chunk, the prefix cache's tokens do not count)."""
        return seq.prefill_len - (seq.num_prefilled or min(seq.num_cached_tokens, len(seq) - 1))

    def _admit(self, seq: Sequence, slots: int, register: bool) -> bool:
        """Give the first waiting sequence blocks for ``slots`` slots and start its prefill, if they fit;
        ``register``: see :meth:`BlockManager.allocate`."""
        rows = 1 if seq.output_token_ids else seq.params.n  # forks of a fresh prompt take ring rows too
        if self.admission is None:
            headroom = len(self.running) * self.blocks.block_size  # a block of growth per running sequence
        else:
            headroom = self.admission.headroom(seq, slots, self.running)
        if not self.blocks.can_allocate(slots + headroom, rows):
            return False
        self.blocks.allocate(seq, slots, self.compression.shareable(len(seq)), register)
        seq.status = Status.RUNNING
        seq.prefill_len, seq.num_prefilled = len(seq), 0
        self.waiting.popleft()
        self.running.append(seq)
        return True

    def _decode(self) -> tuple[list[Sequence], list[tuple[int, int]]]:
        """Every running sequence past its prefill, each with its next slot made writable (preempting the newest
        sequences when blocks run out), and the block copies that takes."""
        batch: list[Sequence] = []
        copies: list[tuple[int, int]] = []
        for seq in list(self.running):
            if seq not in self.running or seq.prefilling:  # preempted for an earlier one, or not decoding yet
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
        self.blocks.flush()
        return batch, copies

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
