"""ThinK: prune the key channels that queries barely use; keys are stored with fewer channels.

Xu et al., 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning" (arXiv:2407.21018). Per KV head,
channel c scores |Q_w[:, c]| * |K[:, c]| (norms over the observation window's queries and over the
keys), a greedy proxy for keeping ||Q K^T|| large. The kept channels are stored as packed rows plus
their indices; attention scatters them back into a zero-filled working copy, which is exactly
attention with the pruned channels' contribution removed. Values and decoded tokens stay whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache.segments import DenseSegment, Segment, ragged_to_padded
from ..shape import KVShape
from .base import Method, Observation
from .registry import register


class ChannelPrunedSegment(Segment):
    """Keys with only ``channels`` (B,H,D') of their D channels; values whole."""

    def __init__(self, keys: Tensor, values: Tensor, lengths: Tensor, channels: Tensor, head_dim: int):
        self.keys, self.values, self.lengths = keys, values, lengths
        self.channels, self.head_dim = channels, head_dim

    @classmethod
    def prune(cls, seg: DenseSegment, channels: Tensor) -> "ChannelPrunedSegment":
        keys, _, valid = seg.dense()
        idx = channels.long().unsqueeze(2).expand(*keys.shape[:3], channels.shape[-1])
        return cls(keys.gather(-1, idx)[valid], seg.values, seg.lengths, channels, keys.shape[-1])

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        pruned, valid = ragged_to_padded(self.keys, self.lengths)
        keys = pruned.new_zeros(*pruned.shape[:3], self.head_dim)
        idx = self.channels.long().unsqueeze(2).expand(*pruned.shape)
        keys.scatter_(-1, idx, pruned)
        return keys, ragged_to_padded(self.values, self.lengths)[0], valid

    def select(self, keep: Tensor) -> "ChannelPrunedSegment":
        pruned, valid = ragged_to_padded(self.keys, self.lengths)
        values, _ = ragged_to_padded(self.values, self.lengths)
        mask = keep & valid
        return ChannelPrunedSegment(pruned[mask], values[mask], mask.sum(-1), self.channels, self.head_dim)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.channels))


@register
@dataclass
class ThinK(Method):
    """Prune ``ratio`` of each KV head's key channels at prefill, chosen from the last ``window`` queries."""

    ratio: float = 0.5
    window: int = 32
    name = "think"
    summary = "query-driven key-channel pruning (keys stored with fewer channels)"
    paper = "Xu et al. 2024, ThinK: Thinner Key Cache by Query-Driven Pruning, arXiv:2407.21018"

    def validate(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"{self.name}: ratio={self.ratio} must be in [0, 1): the share of key channels pruned")
        if self.window < 1:
            raise ValueError(f"{self.name}: window={self.window} must be >= 1")

    def channels(self, obs: Observation) -> Tensor:
        """(B, H, D') kept channel indices per KV head, sorted, as int16."""
        head_dim = obs.keys.shape[-1]
        kept = head_dim - int(round(self.ratio * head_dim))
        queries = obs.queries[:, :, -self.window :].float()
        batch, q_heads, w, _ = queries.shape
        q_norm = queries.reshape(batch, q_heads // obs.group, obs.group * w, head_dim).norm(dim=2)
        k_norm = (obs.keys.float() * obs.valid.unsqueeze(-1)).norm(dim=2)
        top = (q_norm * k_norm).topk(kept, dim=-1).indices.sort(-1).values
        return top.to(torch.int16)

    def on_prefill(self, obs: Observation) -> None:
        if self.ratio == 0:
            return
        channels = obs.layer.state.setdefault("think", self.channels(obs))
        obs.layer.replace(
            [ChannelPrunedSegment.prune(s, channels) if isinstance(s, DenseSegment) else s for s in obs.layer.segments]
        )

    def storage_bytes(self, shape: KVShape, tokens: list[float]) -> int:
        kept = shape.head_dim - int(round(self.ratio * shape.head_dim))
        per_token = shape.num_kv_heads * (kept + shape.head_dim) * shape.element_bytes
        index = shape.num_layers * shape.num_kv_heads * kept * 2 if self.ratio else 0
        return int(round(sum(tokens) * per_token)) + index
