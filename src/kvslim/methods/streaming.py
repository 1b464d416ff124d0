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
