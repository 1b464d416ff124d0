"""LagKV: score each chunk of tokens against the chunk that follows it; no attention needed.

Liang et al., 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important"
(arXiv:2504.04704). After the ``sinks``, the held tokens are cut into chunks of ``lag`` tokens. A chunk's
keys (and values) are min-max normalised per channel by the range of the *next* chunk, the "lag"
reference of what later context looks like; a token whose normalised vector spreads widely (a high
standard deviation over channels) stands out from what follows and is kept. Within a chunk the spreads
go through a softmax, keys' and values' scores add, and the layer keeps the top ones. A chunk without a
whole chunk after it has no reference: it is kept (the last ``lag`` to ``2 * lag - 1`` tokens), as are
the sinks, so the budget should exceed ``sinks + 2 * lag``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Observation, ScoredEviction
from .registry import register


def _chunks(obs: Observation, sinks: int, lag: int) -> tuple[Tensor, Tensor]:
    """Each held token's chunk (B,H,T) (-1 for sinks and padding) and whether that chunk has a whole next one."""
    rank, count = obs.time_rank()
    chunk = torch.where(obs.valid & (rank >= sinks), (rank - sinks).div(lag, rounding_mode="floor"), -1)
    whole = (count - sinks).clamp(min=0).div(lag, rounding_mode="floor")  # (B, H) complete chunks
    return chunk, (chunk >= 0) & (chunk < (whole - 1).unsqueeze(-1))


def _lag_spread(x: Tensor, chunk: Tensor, scored: Tensor) -> Tensor:
    """Per token: softmax over its chunk of the channel std of ``x`` (B,H,T,D) normalised by the next chunk's range."""
    batch, heads, length, dim = x.shape
    buckets = length + 2  # chunk ids stay below length; the last bucket collects sinks and padding
    bucket = torch.where(chunk >= 0, chunk, buckets - 1)
    index = bucket.unsqueeze(-1).expand_as(x)
    lo = x.new_full((batch, heads, buckets, dim), float("inf")).scatter_reduce(2, index, x, "amin")
    hi = x.new_full((batch, heads, buckets, dim), float("-inf")).scatter_reduce(2, index, x, "amax")
    ref = (bucket + 1).clamp(max=buckets - 1).unsqueeze(-1).expand_as(x)
    lo, hi = lo.gather(2, ref), hi.gather(2, ref)
    spread = ((x - lo) / (hi - lo).clamp(min=1e-6)).std(-1).masked_fill(~scored, float("-inf"))
    top = spread.new_full((batch, heads, buckets), float("-inf")).scatter_reduce(2, bucket, spread, "amax")
    weight = (spread - top.gather(2, bucket)).exp().nan_to_num(0.0)  # unscored tokens: exp(-inf - -inf) -> 0
    total = weight.new_zeros(batch, heads, buckets).scatter_add(2, bucket, weight)
    return weight / total.gather(2, bucket).clamp(min=1e-30)


@register
@dataclass
class LagKV(ScoredEviction):
    """Keys' plus values' lag-relative spread scores; ``lag`` tokens per chunk; sinks and the unreferenced tail kept."""

    sinks: int = 4
    lag: int = 128
    name = "lagkv"
    summary = "chunks scored by spread against the next chunk's min/max (attention-free)"
    paper = "Liang et al. 2025, LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important, arXiv:2504.04704"

    def validate(self) -> None:
        super().validate()
        if self.lag < 2:
            raise ValueError(f"{self.name}: lag={self.lag} must be >= 2 tokens per chunk (e.g. 128)")

    def protected(self, obs: Observation) -> Tensor:
        chunk, scored = _chunks(obs, self.sinks, self.lag)
        return super().protected(obs) | (obs.valid & (chunk >= 0) & ~scored)

    def score(self, obs: Observation) -> Tensor:
        chunk, scored = _chunks(obs, self.sinks, self.lag)
        return _lag_spread(obs.keys.float(), chunk, scored) + _lag_spread(obs.values.float(), chunk, scored)
