"""KeyDiff: keep the keys least like the average key; distinctive keys are the ones attention singles out.

Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments" (arXiv:2504.15364). Per KV head, the anchor is the mean of the held
keys' unit vectors; a token's score is minus its key's cosine similarity to that anchor. Keys near the
anchor carry what most keys carry (a query that matches them matches many), so they are the cheapest to
lose. Needs no attention weights, so it works beside fused attention kernels and in the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .base import Observation, ScoredEviction
from .registry import register


@register
@dataclass
class KeyDiff(ScoredEviction):
    """Score = -cos(key, mean unit key of its head), over the tokens the head holds."""

    name = "keydiff"
    summary = "keep keys least similar to the head's mean key (attention-free)"
    paper = "Park et al. 2025, KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference, arXiv:2504.15364"

    def score(self, obs: Observation) -> Tensor:
        unit = F.normalize(obs.keys.float(), dim=-1) * obs.valid.unsqueeze(-1)
        anchor = F.normalize(unit.sum(2, keepdim=True), dim=-1)  # (B, H, 1, D): the mean direction of held keys
        return -(unit * anchor).sum(-1)
