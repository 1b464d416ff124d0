"""Quest: every token is kept; each decoding step reads only the pages whose keys may matter to its query.

Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (arXiv:2406.10774).
Per page of ``page`` tokens and KV head, the element-wise minimum and maximum of its keys bound ``q·k`` from
above (see :mod:`kvslim.kernels.quest_ref`); a step reads the ``budget // page`` pages of highest bound (the
newest page and the first ``sink_pages`` always among them) and attends exactly over them.

It saves bandwidth, not memory: the cache holds every token plus two vectors per page (the extrema), so it
is *larger* than a full cache (:meth:`Quest.storage_bytes`), while a step reads the extrema of every page
and ``budget`` tokens instead of the whole context (:func:`step_read_bytes`). Under ``kvslim.Cache`` the
storage is :class:`kvslim.cache.quest.QuestSegment`; in the engine, :class:`kvslim.engine.quest_kv.QuestKV`
keeps the extrema per block (a page is a block: ``block_size`` = ``page``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..cache.layer import LayerKV
from ..cache.quest import QuestSegment
from ..cache.segments import DenseSegment
from ..shape import KVShape
from .base import Method, Observation
from .registry import register


def step_read_bytes(shape: KVShape, context: int, budget: int | None = None, page: int = 16) -> int:
    """KV bytes one decoding step reads for one sequence of ``context`` tokens, over every layer.

    ``budget`` None: a full read (every key and value). Otherwise Quest's: the extrema of every page plus the keys
    and values of the ``budget // page`` pages read (at most the context's pages).
    """
    vector = shape.num_kv_heads * shape.head_dim * shape.element_bytes  # one key (or value) of every KV head
    if budget is None:
        return shape.num_layers * context * 2 * vector
    pages = math.ceil(context / page)
    read = min(budget // page, pages) * page
    return shape.num_layers * (pages * 2 * vector + min(read, context) * 2 * vector)


@register
@dataclass
class Quest(Method):
    """Keep everything; per decoding step read the ``budget // page`` pages of highest key bound per KV head."""

    budget: int = 2048
    page: int = 16
    sink_pages: int = 1
    name = "quest"
    summary = "per-page key min/max bound each query; a step reads only the top pages (saves bandwidth, not memory)"
    paper = "Tang et al. 2024, Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference, arXiv:2406.10774"

    def validate(self) -> None:
        if self.page < 1 or self.page & (self.page - 1):
            raise ValueError(f"{self.name}: page={self.page} must be a power of two (tokens per page, the engine's "
                             "block_size), e.g. 16")
        if self.sink_pages < 0:
            raise ValueError(f"{self.name}: sink_pages={self.sink_pages} must be >= 0")
        if self.budget < (self.sink_pages + 1) * self.page:
            raise ValueError(f"{self.name}: budget={self.budget} must cover the sink pages and the newest page: at "
                             f"least {(self.sink_pages + 1) * self.page} tokens (budget // page pages are read)")

    @property
    def top(self) -> int:
        """Pages read per KV head and step."""
        return self.budget // self.page

    def check_hybrid(self, parts: list[Method], position: int) -> None:
        if position != len(parts) - 1:
            raise ValueError(f"{self.name} stores the tokens it is given with page extrema, so it must come last: "
                             "e.g. 'snapkv+quest'")

    def on_prefill(self, obs: Observation) -> None:
        self._fold(obs.layer)

    def on_decode(self, obs: Observation) -> None:
        self._fold(obs.layer)

    def _fold(self, layer: LayerKV) -> None:
        """Make the layer one :class:`QuestSegment` holding every token, the newest ones included."""
        first, *rest = layer.segments
        if not all(isinstance(s, DenseSegment) for s in layer.segments):
            raise ValueError(f"{self.name} stores plain key/value storage; it can follow eviction methods only")
        if not isinstance(first, QuestSegment):
            first = QuestSegment.build(first, self.page, self.top, self.sink_pages)  # type: ignore[arg-type]
        for segment in rest:
            first = first.extend(segment)  # type: ignore[arg-type]
        layer.replace([first])

    def storage_bytes(self, shape: KVShape, tokens: list[float]) -> int:
        """Every token's key and value plus, per page and KV head, its key minimum and maximum: more than full."""
        vector = shape.num_kv_heads * shape.head_dim * shape.element_bytes
        return int(round(sum(t * 2 * vector + math.ceil(t / self.page) * 2 * vector for t in tokens)))
