"""R-KV: hold a budget while a reasoning model writes, dropping tokens that are unimportant *or* redundant.

Cai et al., 2025, "R-KV: Redundancy-aware KV Cache Compression for Training-Free Reasoning Models
Acceleration" (arXiv:2505.24133). Long reasoning traces repeat themselves, so attention alone keeps many
near-copies. Each token gets an importance (SnapKV's votes of the newest ``window`` queries, averaged
and max-pooled) and a redundancy (its key's mean cosine similarity to the other keys of its head,
softmaxed over the head's tokens); the score is ``mix * importance - (1 - mix) * redundancy``. Both are
distributions over the head's tokens, so they mix on one scale. The mean similarity is computed from
the sum of unit keys (no T x T matrix), so scoring stays linear in the tokens held; the paper's extra
step that spares the newest of a group of near-duplicates is not done. Decode-time: the budget is
held while generating, every ``interval`` steps (the paper's buffer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .base import Observation, ScoredEviction
from .registry import register
from .snapkv import window_votes


def redundancy(obs: Observation) -> Tensor:
    """(B,H,T) softmax over held tokens of each key's mean cosine similarity to the head's other held keys."""
    unit = F.normalize(obs.keys.float(), dim=-1) * obs.valid.unsqueeze(-1)
    others = (obs.valid.sum(-1, keepdim=True) - 1).clamp(min=1)  # (B, H, 1)
    similarity = ((unit * unit.sum(2, keepdim=True)).sum(-1) - 1) / others  # minus each key's similarity to itself
    return similarity.masked_fill(~obs.valid, float("-inf")).softmax(-1)


@register
@dataclass
class RKV(ScoredEviction):
    """Importance (window votes) minus redundancy (key similarity), held at the budget while decoding."""

    window: int = 8
    kernel: int = 7
    mix: float = 0.1
    name = "rkv"
    summary = "decode-time: window attention importance minus key-similarity redundancy, budget held while generating"
    paper = "Cai et al. 2025, R-KV: Redundancy-aware KV Cache Compression for Training-Free Reasoning Models Acceleration, arXiv:2505.24133"
    decode_time = True

    def validate(self) -> None:
        super().validate()
        if self.window < 1:
            raise ValueError(f"{self.name}: window={self.window} must be >= 1 (newest queries that vote)")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel={self.kernel} must be a positive odd pooling width, e.g. 7")
        if not 0 <= self.mix <= 1:
            raise ValueError(f"{self.name}: mix={self.mix} must be in [0, 1]: the weight of importance against redundancy")

    def score(self, obs: Observation) -> Tensor:
        importance = window_votes(obs, self.window, self.kernel) / min(self.window, obs.q_len)
        return self.mix * importance - (1 - self.mix) * redundancy(obs)
