"""TOVA: at every step, drop the token the newest query attends to least.

Oren et al., 2024, "Transformers are Multi-State RNNs" (arXiv:2401.06104). As in the paper, the
attention is averaged over the layer's heads (one decision per layer); ``per_head=True`` lets each
KV head decide for itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Observation, ScoredEviction
from .registry import register


@register
@dataclass
class TOVA(ScoredEviction):
    """Prefill keeps the budget by the last prompt query's attention; decoding holds it constant."""

    per_head: bool = False
    name = "tova"
    summary = "drop the lowest attention of the newest query, every step"
    paper = "Oren et al. 2024, Transformers are Multi-State RNNs, arXiv:2401.06104"
    decode_time = True

    def score(self, obs: Observation) -> Tensor:
        attn = obs.attention(1)[:, :, -1]  # (B, H, T)
        return attn if self.per_head else attn.mean(1, keepdim=True).expand_as(attn)
