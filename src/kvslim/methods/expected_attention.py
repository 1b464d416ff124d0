"""ExpectedAttention: score each token by the attention that *future* queries are expected to pay it.

Devoto et al., 2025, "Expected Attention: KV cache compression by estimating attention from future
queries distribution" (arXiv:2510.00636), as its authors' reference implementation (NVIDIA kvpress's
``ExpectedAttentionPress``) computes it. Queries of a head are modelled as Gaussian: the mean ``mu`` and
covariance ``S`` of the prompt's queries after the ``sinks`` first positions (their queries are outliers),
each first rotated (RoPE) to the newest position. A query ``d`` positions ahead is that Gaussian rotated by
``d`` more, so averaging the rotation over the next ``future`` positions gives ``A``, and future queries
~ N(A mu, A S A^T). For a Gaussian query the expected exponentiated logit has a closed form,
E[exp(s q.k)] = exp(s mu'.k + s^2 k^T S' k / 2) with ``s`` the attention scaling (1/sqrt(d)): a softmax
over these logits of the non-sink keys is the expected attention; it is averaged over each KV head's query
group and multiplied by the value's norm (what the token can contribute to the output). The sinks are
left out of the softmax (as in the reference: with them in, the group mean would weight each query head by
how little it sends to the sinks) and are always kept.

Same statistics as the reference's: it takes the queries before RoPE (the projection's bias included) and
averages the rotation over the absolute positions ``T .. T+future-1``; rotating the post-RoPE query of
position ``i`` back by ``T-1-i`` gives ``R(T-1) q_i``, and ``A R(T-1)`` is that same average (RoPE's
rotations commute), so the two agree exactly (``tests/methods/test_frontier.py`` checks it).

Why ``history`` is bounded (4096 by default, ``history=None`` for every query): a backend keeps the newest
:attr:`observed` queries wherever the prompt is not scored in one pass (chunked prefill keeps them across
chunks, decode-time compression across steps), and a query costs more than the key and value it belongs to
under grouped-query attention (Qwen2.5-0.5B: 14 query heads to 2 KV heads, 3.5x a token's KV). 4096 is
every query of a RULER-4k prompt (the reference's result there) at a bounded cost; longer prompts are
modelled by their newest 4096 queries.
"""
from __future__ import annotations

import sys
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


def query_statistics(queries: Tensor, rope: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (B,Hq,D) and covariance (B,Hq,D,D) of the queries (B,Hq,n,D) whose ``weights`` (B,n) are 1, each
    rotated to the newest one's position (the covariance divides by their count, as the reference does)."""
    n = queries.shape[2]
    back = torch.arange(n - 1, -1, -1, device=queries.device, dtype=torch.float32)[:, None] * rope[None]  # (n, D/2)
    cos, sin = torch.cat((back.cos(), back.cos()), -1), torch.cat((back.sin(), back.sin()), -1)
    aligned = queries * cos + rotate_half(queries) * sin
    weights = weights[:, None, :, None].to(aligned.dtype)
    count = weights.sum(2).clamp(min=1)  # (B,1,1): no query left (a prompt of sinks only) gives a zero mean
    mean = (aligned * weights).sum(2) / count
    centered = (aligned - mean.unsqueeze(2)) * weights
    return mean, centered.transpose(-1, -2) @ centered / count.unsqueeze(-1)


@register
@dataclass
class ExpectedAttention(ScoredEviction):
    """Closed-form expected attention of the next ``future`` queries, from the prompt's queries after the sinks,
    x |value|; ``history`` bounds the queries to the newest ones (None: all)."""

    sinks: int = 4
    history: int | None = 4096
    future: int = 512
    covariance: bool = True
    #: added to the expected attention before it is multiplied by |value| (kvpress's ``epsilon``). The press's own
    #: default is 0, but every result its authors publish (kvpress's evaluation registry and leaderboard) runs it with
    #: 0.01 (as ``adakv(expected_attention)`` here): against a mean attention of 1/T it lets the value norm rank the
    #: tokens expected to be little attended, which keeps whole needles (Qwen2.5-0.5B, RULER niah 1k: 7/8 with it,
    #: 0/8 without); ``epsilon=0`` is the bare press
    epsilon: float = 0.01
    name = "expected_attention"
    summary = "closed-form attention expected from future queries (query mean/covariance, RoPE-projected) x value norm"
    paper = "Devoto et al. 2025, Expected Attention: KV cache compression by estimating attention from future queries distribution, arXiv:2510.00636"

    def validate(self) -> None:
        super().validate()
        if self.history is not None and self.history < 1:
            raise ValueError(f"{self.name}: history={self.history} must be >= 1 (queries), or None for every query")
        if self.future < 1:
            raise ValueError(f"{self.name}: future={self.future} must be >= 1 (positions)")
        if self.epsilon < 0:
            raise ValueError(f"{self.name}: epsilon={self.epsilon} must be >= 0 (added to the expected attention)")

    @property
    def observed(self) -> int:
        return sys.maxsize if self.history is None else self.history

    def query_weights(self, obs: Observation, n: int) -> Tensor:
        """(B, n) 1 for the newest ``n`` queries that belong to a real position past the sinks, 0 for the sinks'
        and for batch padding's. The queries are the newest ones of ``prompt`` positions, plus the decoding steps
        remembered so far (``<name>.steps``, counted by :meth:`ScoredEviction.due`)."""
        steps = obs.layer.state.get(f"{self.name}.steps", 0) if obs.phase == "decode" else 0
        total = obs.layer.state["prompt"].to(obs.queries.device) + steps  # (B,)
        position = total[:, None] - n + torch.arange(n, device=obs.queries.device)
        return position >= self.sinks

    def score(self, obs: Observation) -> Tensor:
        head_dim = obs.keys.shape[-1]
        if obs.rope is None or 2 * obs.rope.shape[0] != head_dim:
            raise ValueError(f"{self.name} projects queries with RoPE over the whole head; this model's rotary "
                             "frequencies are unknown or partial: use another method (e.g. snapkv, keydiff)")
        rope = obs.rope.float()
        queries = obs.queries if self.history is None else obs.queries[:, :, -self.history :]
        mean, cov = query_statistics(queries.float(), rope, self.query_weights(obs, queries.shape[2]))
        rotation = future_rotation(rope, self.future)
        mean = mean @ rotation.T
        keys = obs.keys.float().repeat_interleave(obs.group, dim=1)  # (B, Hq, T, D)
        logits = obs.scaling * (keys @ mean.unsqueeze(-1)).squeeze(-1)
        if self.covariance:
            cov = rotation @ cov @ rotation.T
            logits = logits + obs.scaling**2 / 2 * ((keys @ cov) * keys).sum(-1)
        rank, _ = obs.time_rank()
        scored = (obs.valid & (rank >= self.sinks)).repeat_interleave(obs.group, dim=1)
        probs = logits.masked_fill(~scored, float("-inf")).softmax(-1).nan_to_num(0.0)  # sinks: kept by protected()
        batch, q_heads, length = probs.shape
        expected = probs.view(batch, q_heads // obs.group, obs.group, length).mean(2)
        return (expected + self.epsilon) * obs.values.float().norm(dim=-1)
