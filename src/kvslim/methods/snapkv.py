"""SnapKV: the last prompt tokens (the observation window) vote, through their attention, for what to keep.

Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation" (arXiv:2404.14469).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .base import Observation, ScoredEviction
from .registry import register


def window_votes(obs: Observation, window: int, kernel: int, pooling: str = "max") -> Tensor:
    """SnapKV's score: attention of the window's queries summed, then pooled along tokens.

    Pooling keeps neighbours of a hit together, so kept spans stay readable (the paper's clustering
    step); max pooling (the reference implementation's default) keeps a whole multi-token number
    when any of its tokens is hit, where average pooling can split it.
    """
    votes = obs.attention(window).sum(2)  # (B, H, T)
    if kernel > 1:
        batch, heads, length = votes.shape
        pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
        votes = pool(votes.view(batch * heads, 1, length), kernel, stride=1, padding=kernel // 2)
        votes = votes.view(batch, heads, -1)[..., :length]
    return votes


@register
@dataclass
class SnapKV(ScoredEviction):
    """Select once at the end of prefill; the window itself is always kept; decoding then grows the cache."""

    window: int = 32  # the paper's observation window; 64 let filler tokens outvote the question on SmolLM2
    kernel: int = 7
    pooling: str = "max"
    name = "snapkv"
    summary = "observation-window attention votes, pooled, at the end of prefill"
    paper = "Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation, arXiv:2404.14469"

    def validate(self) -> None:
        super().validate()
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel={self.kernel} must be a positive odd pooling width, e.g. 7")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"{self.name}: pooling={self.pooling!r} must be 'max' or 'avg'")
        if self.window < 1:
            raise ValueError(f"{self.name}: window={self.window} must be >= 1 (observation window in tokens)")

    def score(self, obs: Observation) -> Tensor:
        return window_votes(obs, self.window, self.kernel, self.pooling)
