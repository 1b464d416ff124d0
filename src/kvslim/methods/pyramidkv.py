"""PyramidKV: lower layers attend broadly and keep more, upper layers focus and keep less.

Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(arXiv:2406.02069). Layer budgets fall linearly from bottom to top; their mean equals the requested
budget, and within a layer tokens are chosen by SnapKV's window votes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Observation
from .registry import register
from .snapkv import SnapKV


def pyramid_budgets(mean: int, n_tokens: int, num_layers: int, beta: float) -> list[int]:
    """Integer per-layer budgets: a linear pyramid with top/bottom ratio set by ``beta``, mean = ``mean``.

    Budgets are capped at ``n_tokens``; what a capped layer cannot use goes to the others, so the
    mean holds whenever ``mean <= n_tokens``.
    """
    mean = min(mean, n_tokens)
    if num_layers == 1:
        return [mean]
    low = mean / beta
    high = 2 * mean - low
    shape = [high - (high - low) * i / (num_layers - 1) for i in range(num_layers)]
    budgets = [min(n_tokens, int(b)) for b in shape]
    deficit = mean * num_layers - sum(budgets)
    while deficit > 0:  # hand out what rounding and capping took, bottom layers first
        for i in range(num_layers):
            if deficit and budgets[i] < n_tokens:
                budgets[i] += 1
                deficit -= 1
    return budgets


@register
@dataclass
class PyramidKV(SnapKV):
    """SnapKV selection with per-layer budgets shaped as a pyramid (``beta`` = bottom/top steepness)."""

    beta: float = 20.0
    name = "pyramidkv"
    summary = "SnapKV with pyramid-shaped layer budgets (same mean)"
    paper = "Cai et al. 2024, PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling, arXiv:2406.02069"

    def validate(self) -> None:
        super().validate()
        if self.beta <= 1:
            raise ValueError(f"{self.name}: beta={self.beta} must be > 1 (ratio of the bottom to the top budget)")

    def layer_budget(self, obs: Observation, held: Tensor) -> Tensor:
        known = self.host_prompt(obs)  # read ``state["prompt"]`` back only when the host does not know it
        prompt = [known] * held.shape[0] if known is not None else obs.layer.state["prompt"].tolist()
        per_seq = [self.pyramid_budget(n, obs) for n in prompt]
        target = torch.tensor(per_seq, device=held.device).unsqueeze(-1).expand_as(held)
        return torch.minimum(target, held)

    def pyramid_budget(self, n_tokens: int, obs: Observation) -> int:
        """This layer's budget for a prompt of ``n_tokens``."""
        return pyramid_budgets(int(self.tokens_for(n_tokens)), n_tokens, obs.num_layers, self.beta)[obs.layer_idx]

    def uniform_budget(self, obs: Observation) -> int | None:
        prompt = self.host_prompt(obs)  # every row holds the prompt: the budget capped by it
        return None if prompt is None else min(prompt, self.pyramid_budget(prompt, obs))

    def planned_tokens(self, n_tokens: int, layer_idx: int, num_layers: int) -> float:
        return float(pyramid_budgets(int(self.tokens_for(n_tokens)), n_tokens, num_layers, self.beta)[layer_idx])
