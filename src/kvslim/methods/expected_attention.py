"""ExpectedAttention: score each token by the attention that *future* queries are expected to pay it.

Devoto et al., 2025, "Expected Attention: KV cache compression by estimating attention from future
queries distribution" (arXiv:2510.00636). Queries of a head are modelled as Gaussian: the mean ``mu`` and
covariance ``S`` of its newest ``history`` queries, each first rotated (RoPE) to the newest position.
A query ``d`` positions ahead is that Gaussian rotated by ``d`` more, so averaging the rotation over the
next ``future`` positions gives ``A``, and future queries ~ N(A mu, A S A^T). For a Gaussian query the
expected exponentiated logit has a closed form, E[exp(s q.k)] = exp(s mu'.k + s^2 k^T S' k / 2) with
``s`` the attention scaling (1/sqrt(d)): a softmax over these logits is the expected attention; it is
averaged over each KV head's query group and multiplied by the value's norm (what the token can
contribute to the output). The sinks are always kept. Works at prefill and, with ``decode_budget``,
while generating (the query window is carried across steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Observation, ScoredEviction
from .registry import register


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def future_rotation(rope: Tensor, future: int) -> Tensor:
    """(D, D) mean of the RoPE rotations by 1..``future`` positions (half-split layout): a linear map, not a rotation."""
    angles = torch.arange(1, future + 1, device=rope.device, dtype=torch.float32)[:, None] * rope[None]
    cos, sin = (torch.cat((t, t)).to(rope.device) for t in (angles.cos().mean(0), angles.sin().mean(0)))
    eye = torch.eye(2 * rope.shape[0], device=rope.device)
    return (eye * cos + rotate_half(eye) * sin).T  # row j of the map applied to the identity is column j of A


def query_statistics(queries: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (B,Hq,D) and covariance (B,Hq,D,D) of the queries (B,Hq,n,D), each rotated to the newest one's position."""
    n = queries.shape[2]
    back = torch.arange(n - 1, -1, -1, device=queries.device, dtype=torch.float32)[:, None] * rope[None]  # (n, D/2)
    cos, sin = torch.cat((back.cos(), back.cos()), -1), torch.cat((back.sin(), back.sin()), -1)
    aligned = queries * cos + rotate_half(queries) * sin
    mean = aligned.mean(2)
    centered = aligned - mean.unsqueeze(2)
    return mean, centered.transpose(-1, -2) @ centered / max(n - 1, 1)


@register
@dataclass
class ExpectedAttention(ScoredEviction):
    """Closed-form expected attention of the next ``future`` queries, from the newest ``history`` queries, x |value|."""

    sinks: int = 4
    history: int = 512
    future: int = 512
    covariance: bool = True
    name = "expected_attention"
    summary = "closed-form attention expected from future queries (query mean/covariance, RoPE-projected) x value norm"
    paper = "Devoto et al. 2025, Expected Attention: KV cache compression by estimating attention from future queries distribution, arXiv:2510.00636"

    def validate(self) -> None:
        super().validate()
        for name in ("history", "future"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.name}: {name}={getattr(self, name)} must be >= 1 (positions)")

    @property
    def observed(self) -> int:
        return self.history

    def score(self, obs: Observation) -> Tensor:
        head_dim = obs.keys.shape[-1]
        if obs.rope is None or 2 * obs.rope.shape[0] != head_dim:
            raise ValueError(f"{self.name} projects queries with RoPE over the whole head; this model's rotary "
                             "frequencies are unknown or partial: use another method (e.g. snapkv, keydiff)")
        rope = obs.rope.float()
        mean, cov = query_statistics(obs.queries[:, :, -self.history :].float(), rope)
        rotation = future_rotation(rope, self.future)
        mean = mean @ rotation.T
        keys = obs.keys.float().repeat_interleave(obs.group, dim=1)  # (B, Hq, T, D)
        logits = obs.scaling * (keys @ mean.unsqueeze(-1)).squeeze(-1)
        if self.covariance:
            cov = rotation @ cov @ rotation.T
            logits = logits + obs.scaling**2 / 2 * ((keys @ cov) * keys).sum(-1)
        valid = obs.valid.repeat_interleave(obs.group, dim=1)
        probs = logits.masked_fill(~valid, float("-inf")).softmax(-1)
        batch, q_heads, length = probs.shape
        expected = probs.view(batch, q_heads // obs.group, obs.group, length).mean(2)
        return expected * obs.values.float().norm(dim=-1)
