"""A control: keep a random subset at the same budget, to show that a method's scores matter."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Observation, ScoredEviction
from .registry import register


@register
@dataclass
class Random(ScoredEviction):
    """Random scores; seeded per layer so runs are reproducible."""

    seed: int = 0
    name = "random"
    summary = "random tokens at the same budget (control)"
    paper = "control baseline (as in kvpress's RandomPress)"

    def score(self, obs: Observation) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + obs.layer_idx * 1009 + obs.layer.seen)
        return torch.rand(obs.valid.shape, generator=gen).to(obs.valid.device)
