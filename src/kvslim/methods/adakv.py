"""AdaKV: one budget per layer, shared out among the KV heads by how concentrated their scores are.

Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference" (arXiv:2407.11550). Heads whose scores are spread out get more tokens, focused heads
fewer; heads really store different lengths (the cache is ragged per head), and the layer's mean per
head equals the requested budget. ``adakv`` scores with SnapKV's window votes, as the paper does;
``adakv(expected_attention)`` (any scorer, with its parameters: ``adakv(keydiff(window=8),floor=0.1)``)
shares the layer budget by that scorer's scores instead. Wrapping makes a subclass of the scorer whose
only change is :meth:`AdaptiveHeads.choose` (the mixin comes after the scorer, so the scorer's parameter
defaults stand), so whatever the scorer does around scoring (accumulated
state, protected tokens, decode-time eviction) is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cache
from typing import ClassVar

import torch
from torch import Tensor

from .base import ScoredEviction, keep_top, scorer_with
from .registry import register
from .snapkv import SnapKV


@dataclass
class AdaptiveHeads(ScoredEviction):
    """Top-(budget x heads) tokens across the layer's heads; each head keeps at least ``floor`` x budget."""

    floor: float = 0.2
    name = "adakv"
    #: the scorer whose selection this class makes adaptive (None for the registered ``adakv``)
    scorer: ClassVar[type[ScoredEviction] | None] = None

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.floor <= 1:
            raise ValueError(f"{self.name}: floor={self.floor} must be in [0, 1]: the share of the budget every head keeps")

    def choose(self, scores: Tensor, k: Tensor) -> Tensor:
        """Every head keeps its own top ``floor`` x budget; the rest of the layer budget goes to the best anywhere."""
        floor = torch.ceil(k.float() * self.floor).long()
        scores = scores.masked_fill(keep_top(scores, floor) & (scores > float("-inf")), float("inf"))
        batch, heads, length = scores.shape
        return self.keep_layer_top(scores.view(batch, heads * length), k.sum(-1)).view(batch, heads, length)

    def keep_layer_top(self, scores: Tensor, total: Tensor) -> Tensor:
        """(B, heads x T) mask of the ``total`` (B,) best scores of a layer's heads, flattened head by head; ties go
        to the earlier head and token. A tensor-parallel rank holds only some heads and overrides this
        (:class:`kvslim.engine.sharding.ShardedAdaKV`)."""
        return keep_top(scores[:, None], total[:, None])[:, 0]

    @classmethod
    def wrap(cls, scorer: "ScoredEviction", floor: float = 0.2) -> ScoredEviction:
        """``scorer`` with AdaKV's per-head budgets: ``adakv(expected_attention)``."""
        if not isinstance(scorer, ScoredEviction) or isinstance(scorer, AdaptiveHeads):
            raise ValueError(f"adakv shares a layer budget by a scorer's token scores; {scorer.name} is not a token "
                             "scorer: wrap one such as snapkv, expected_attention, keydiff, lagkv or knorm")
        params = {f.name: getattr(scorer, f.name) for f in fields(scorer) if f.init}
        return _adaptive(type(scorer))(**params, floor=floor)

    @property
    def spec(self) -> str:
        if self.scorer is None:
            return super().spec
        inner = self.scorer(**{f.name: getattr(self, f.name) for f in fields(self.scorer) if f.init})
        return f"adakv({inner.spec},floor={self.floor})"


@register
@dataclass
class AdaKV(SnapKV, AdaptiveHeads):
    """The paper's pairing: SnapKV's window votes, adaptive per-head budgets."""

    name = "adakv"
    summary = "adaptive per-head budgets under a layer budget (heads keep different lengths); adakv(SCORER) for any scorer"
    paper = "Feng et al. 2024, Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation, arXiv:2407.11550"


@cache
def _adaptive(scorer: type[ScoredEviction]) -> type[ScoredEviction]:
    """The subclass of ``scorer`` that selects with adaptive per-head budgets (one per scorer class)."""
    if scorer is SnapKV:
        return AdaKV
    return scorer_with(scorer, AdaptiveHeads, "AdaKV", name="adakv", scorer=scorer)
