"""StreamingLLM: attention sinks plus a sliding window of recent tokens, held constant while decoding.

Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks" (arXiv:2309.17453).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Observation, ScoredEviction
from .registry import register


@register
@dataclass
class Streaming(ScoredEviction):
    """Keep the first ``sinks`` tokens and the most recent ones up to the budget, at prefill and every step."""

    sinks: int = 4
    name = "streaming"
    summary = "attention sinks + recent window, enforced while decoding"
    paper = "Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks, arXiv:2309.17453"
    decode_time = True

    def score(self, obs: Observation) -> Tensor:
        return obs.time_rank()[0].float()  # newer is better; sinks are protected by the base

    def dropped_span(self, obs: Observation, held: int, count: int) -> tuple[int, int] | None:
        """Keeping ``count`` of ``held`` tokens in time order drops the oldest after the sinks, one run per row,
        when the sinks and the protected window fit in ``count`` (else the protected ones compete: score them)."""
        window = self.window if obs.phase == "prefill" else max(self.window, 1)
        if self.sinks + window > count:
            return None
        return self.sinks, self.sinks + held - count
