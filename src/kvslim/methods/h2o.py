"""H2O: heavy hitters by accumulated attention plus the most recent tokens, held constant while decoding.

Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
(arXiv:2306.14048). Prompt scores accumulate the attention of the last ``window`` prompt queries (not
all of them: that would need the full attention matrix); each decoding step adds the new query's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Observation, ScoredEviction
from .registry import register


@register
@dataclass
class H2O(ScoredEviction):
    """``recent`` is the share of the budget reserved for the newest tokens; the rest go to heavy hitters."""

    window: int = 64
    recent: float = 0.5
    name = "h2o"
    summary = "heavy hitters (accumulated attention) + recent tokens, while decoding"
    paper = "Zhang et al. 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs, arXiv:2306.14048"
    decode_time = True
    token_state = ("h2o",)

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.recent < 1:
            raise ValueError(f"{self.name}: recent={self.recent} must be in [0, 1): the budget share for recent tokens")

    @property
    def decode_observed(self) -> int:
        """Decoding scores are the accumulated attention: they look at no window of queries (``attended`` gets the
        steps' own). One, as an observation holds at least one."""
        return 1

    def protected(self, obs: Observation) -> Tensor:
        rank, count = obs.time_rank()
        recent = torch.ceil(obs.layer.state["budget"] * self.recent).long()
        return obs.valid & ((rank < self.sinks) | (rank >= (count - recent).unsqueeze(-1)))

    def score(self, obs: Observation) -> Tensor:
        return obs.layer.state["h2o"]

    def _add(self, obs: Observation, attention: Tensor) -> None:
        """Add ``attention`` (B,H,T), summed over queries, to the accumulated scores (in place into ``attention``)."""
        acc = obs.layer.state.get("h2o")
        if acc is not None:  # the new tokens are the last columns of the layout
            attention[..., : acc.shape[-1]] += acc
        obs.layer.state["h2o"] = attention

    def on_prefill(self, obs: Observation) -> None:
        self._add(obs, obs.attention(self.window).sum(2))
        super().on_prefill(obs)

    def attended(self, obs: Observation, steps: int) -> None:
        """Each decoding step adds its query's attention; several steps are added one at a time, in their order,
        so the sums are the ones step-by-step decoding makes."""
        attention = obs.attention(steps)
        for step in range(attention.shape[2]):
            self._add(obs, attention[:, :, step])

    def reflow(self, obs: Observation, keep: Tensor) -> None:
        """The scores follow their tokens; tokens appended since the last accumulation have none yet (zero)."""
        acc = obs.layer.state.get("h2o")
        if acc is not None:
            acc = F.pad(acc, (0, keep.shape[-1] - acc.shape[-1]))
            obs.layer.state["h2o"] = obs.layer.compact_like(acc, keep)
