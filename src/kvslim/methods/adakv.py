"""AdaKV: one budget per layer, shared out among the KV heads by how concentrated their attention is.

Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference" (arXiv:2407.11550). Heads whose attention is spread out get more tokens, focused heads
fewer; heads really store different lengths (the cache is ragged per head), and the layer's mean per
head equals the requested budget. Token scores are SnapKV's window votes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import keep_top
from .registry import register
from .snapkv import SnapKV


@register
@dataclass
class AdaKV(SnapKV):
    """Top-(budget x heads) tokens across the layer's heads; each head keeps at least ``floor`` x budget."""

    floor: float = 0.2
    name = "adakv"
    summary = "adaptive per-head budgets under a layer budget (heads keep different lengths)"
    paper = "Feng et al. 2024, Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation, arXiv:2407.11550"

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
