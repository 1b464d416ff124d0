"""Keep the tokens whose keys have the lowest L2 norm: they tend to draw the most attention.

Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (arXiv:2406.11430).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Observation, ScoredEviction
from .registry import register


@register
@dataclass
class KNorm(ScoredEviction):
    """Score = minus the key norm; needs no attention at all."""

    name = "knorm"
    summary = "keep low key-norm tokens (attention-free)"
    paper = "Devoto et al. 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, arXiv:2406.11430"

    def score(self, obs: Observation) -> Tensor:
        return -obs.keys.float().norm(dim=-1)
