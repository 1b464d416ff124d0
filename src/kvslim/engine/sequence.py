"""One sequence being generated: its tokens, its blocks, and how many slots each layer and head holds."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto
from itertools import count
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .decode_eviction import DecodeState


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = count()


@dataclass(eq=False)
class Sequence:
    """Tokens (prompt then output) and the KV storage they occupy.

    Compared by identity (``eq=False``): the scheduler's ``seq in running`` must not compare token lists
    field by field, which made a step's host time grow with the square of the batch.

    Slots: a sequence's blocks, read in table order, are its slots. After a compressed prefill each
    (layer, KV head) holds its own number of slots, ``kv_slots - pad[layer, head]``; ``kv_slots``
    (the most any head holds) decides how many blocks are needed. Every decoded token adds one slot
    to every head. A sliding window (StreamingLLM) hides slots ``[sinks, window_start)``; blocks
    wholly inside that range are handed back and their table entry becomes -1.

    Quantized pages (see :mod:`kvslim.engine.kv_store`) count only packed tokens in slots; the newest
    tokens, still in full precision, sit in the sequence's ``ring_row``, ``tail[layer, head]`` of them.

    A *suffix* (``suffix_tokens``, the query-agnostic protocol's question) is the end of the prompt that the
    method must not compress: the prefill compresses the tokens before it, then runs it uncompressed after
    what was kept (see :attr:`compressed_len`).

    Prefill: from admission until its prompt (``prefill_len`` tokens: prompt and output so far, after a
    preemption) has run, a sequence is *prefilling*; with chunked prefill that takes several steps, each
    running tokens ``[num_prefilled, ...)`` (see :mod:`kvslim.engine.scheduler`).
    """

    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    num_tier_tokens: int = 0  # of those, tokens loaded from the KV tier (not found in device memory)
    kv_slots: int = 0
    pad: Tensor | None = None  # (L, H) slots each head holds fewer than kv_slots; None: all equal
    sinks: int = 0
    window_start: int = 0
    window_budget: int | None = None  # slots per head a sliding window keeps; None: no window
    finish_reason: str | None = None
    text: str = ""
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    preemptions: int = 0
    peak_blocks: int = 0
    generator: torch.Generator | None = None  # seeded sampling (SamplingParams.seed)
    ring_row: int = -1  # row of the ring of newest tokens (quantized pages, KCache) or of the per-head tables (head_kv)
    tail: Tensor | None = None  # (L, H) tokens each head holds in its ring row (stores with a ring)
    #: decode-time compression's state (each layer's budget, the remembered queries); None: none
    method_state: DecodeState | None = None
    suffix_tokens: int = 0  # the prompt's last tokens, prefilled uncompressed after the rest is compressed
    prefill_len: int = 0  # tokens the current prefill runs (len(seq) when admitted); 0 before admission
    num_prefilled: int = 0  # of those, tokens whose keys/values are in pages (0 until its first chunk runs)
    #: per layer, the newest queries (Hq, w, D) of the chunks run so far: an evictor's observation window, scored
    #: with the whole prompt's keys after the last chunk (chunked prefill)
    prefill_queries: list[Tensor] | None = None
    token_times: list[float] = field(default_factory=list)  # when each output token was sampled (latencies)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def compressed_len(self) -> int:
        """Leading tokens a prefill compresses: all of them, or with a suffix those before it (the suffix and any
        output so far, after a preemption, are then appended uncompressed)."""
        return self.num_prompt_tokens - self.suffix_tokens if self.suffix_tokens else len(self)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def prefilling(self) -> bool:
        """Admitted, and part of its prompt has not run yet (chunked prefill spreads it over steps)."""
        return self.num_prefilled < self.prefill_len

    @property
    def num_blocks_held(self) -> int:
        return len(self.block_table) - self.block_table.count(-1)  # -1: a block a sliding window handed back

    def slot_lens(self, num_layers: int, num_heads: int) -> Tensor:
        """(L, H) slots held per layer and KV head."""
        lens = torch.full((num_layers, num_heads), self.kv_slots, dtype=torch.long)
        return lens if self.pad is None else lens - self.pad

    def set_held(self, held: Tensor) -> None:
        """Record the slots (L, H) each head holds in pages."""
        self.kv_slots = int(held.max())
        self.pad = None if bool((held == self.kv_slots).all()) else self.kv_slots - held

    def reset_kv(self) -> None:
        """Forget all storage (preemption by recompute): the next prefill runs prompt and output so far."""
        self.block_table = []
        self.num_cached_tokens = self.num_tier_tokens = self.kv_slots = self.sinks = self.window_start = 0
        self.pad = self.window_budget = self.tail = self.method_state = self.prefill_queries = None
        self.prefill_len = self.num_prefilled = 0

    def fork(self) -> "Sequence":
        """A copy that continues separately; the block manager shares its blocks."""
        child = Sequence(self.prompt_token_ids, self.params, self.request_id, token_ids=list(self.token_ids),
                         suffix_tokens=self.suffix_tokens)
        child.status, child.num_cached_tokens, child.kv_slots = self.status, self.num_cached_tokens, self.kv_slots
        child.pad, child.sinks, child.window_start = self.pad, self.sinks, self.window_start
        child.window_budget, child.arrival, child.first_token_time = self.window_budget, self.arrival, self.first_token_time
        child.tail = None if self.tail is None else self.tail.clone()
        child.prefill_len, child.num_prefilled = self.prefill_len, self.num_prefilled
        child.token_times = list(self.token_times)
        return child
