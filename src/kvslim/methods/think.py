"""ThinK: prune the key channels that queries barely use; keys are stored with fewer channels.

Xu et al., 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning" (arXiv:2407.21018). Per KV head,
channel c scores |Q_w[:, c]| * |K[:, c]| (norms over the observation window's queries and over the
keys), a greedy proxy for keeping ||Q K^T|| large. The kept channels are stored as packed rows plus
their indices; attention scatters them back into a zero-filled working copy, which is exactly
attention with the pruned channels' contribution removed. Values stay whole.

Decoded tokens: with ``prune_decoded`` (the default) each decoded key attends whole at its own step, then is
kept with the prompt's channels like the rest (a thin growing tail, :class:`ChannelPrunedTail`), so every stored
key is thin (what :meth:`ThinK.storage_bytes` counts, and what the paged engine's fixed-width key pages hold).
The authors' code instead keeps decoded keys whole (``think(prune_decoded=false)``, kvslim.Cache only). Measured
cost of the thin tail (RULER-4k, Qwen2.5-Coder-0.5B, question compressed with the context, fp32 CPU): niah_single_1
3/8 with it, 8/8 without (the answer's second digit is lost once the question's and the answer's keys are both
thin); with the question appended whole (query-agnostic) 7/8. Prefer ``prune_decoded=false`` for quality where
the engine is not needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache.buffers import GrowingSegment
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
        return cls(keep_channels(keys, channels)[valid], seg.values, seg.lengths, channels, keys.shape[-1])

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        pruned, valid = ragged_to_padded(self.keys, self.lengths)
        return spread_channels(pruned, self.channels, self.head_dim), ragged_to_padded(self.values, self.lengths)[0], valid

    def select(self, keep: Tensor) -> "ChannelPrunedSegment":
        pruned, valid = ragged_to_padded(self.keys, self.lengths)
        values, _ = ragged_to_padded(self.values, self.lengths)
        mask = keep & valid
        return ChannelPrunedSegment(pruned[mask], values[mask], mask.sum(-1), self.channels, self.head_dim)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.channels))


def keep_channels(keys: Tensor, channels: Tensor) -> Tensor:
    """(B,H,T,D) keys -> (B,H,T,D') their ``channels`` (B,H,D') of each head."""
    return keys.gather(-1, channels.long().unsqueeze(2).expand(*keys.shape[:3], channels.shape[-1]))


def spread_channels(pruned: Tensor, channels: Tensor, head_dim: int) -> Tensor:
    """(B,H,T,D') kept channels -> (B,H,T,D) keys with zeros in the pruned channels."""
    keys = pruned.new_zeros(*pruned.shape[:3], head_dim)
    return keys.scatter_(-1, channels.long().unsqueeze(2).expand(*pruned.shape), pruned)


class ChannelPrunedTail(Segment):
    """Decoded keys with only ``channels`` (B,H,D') of their D channels, appended in place (a growing buffer)."""

    def __init__(self, tail: GrowingSegment, channels: Tensor, head_dim: int):
        self.tail, self.channels, self.head_dim = tail, channels, head_dim

    @property
    def lengths(self) -> Tensor:  # type: ignore[override]
        return self.tail.lengths

    def append(self, keys: Tensor, values: Tensor) -> None:
        """Keep the kept channels of (B,H,q,D) keys, and the values whole."""
        self.tail = self.tail.append(keep_channels(keys, self.channels), values)

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        pruned, values, valid = self.tail.dense()
        return spread_channels(pruned, self.channels, self.head_dim), values, valid

    def select(self, keep: Tensor) -> "ChannelPrunedSegment":
        pruned, values, valid = self.tail.dense()
        mask = keep & valid
        return ChannelPrunedSegment(pruned[mask], values[mask], mask.sum(-1), self.channels, self.head_dim)

    def nbytes(self) -> int:
        return self.tail.nbytes()  # the channel indices are counted once, with the prompt's segment


@register
@dataclass
class ThinK(Method):
    """Prune ``ratio`` of each KV head's key channels at prefill, chosen from the last ``window`` queries."""

    ratio: float = 0.5
    window: int = 32
    prune_decoded: bool = True  # decoded keys kept thin too (see the module docstring)
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
        kept = self.kept_channels(head_dim)
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

    def kept_channels(self, head_dim: int) -> int:
        """D': the key channels each head keeps."""
        return head_dim - int(round(self.ratio * head_dim))

    def on_decode(self, obs: Observation) -> None:
        """Move the step's keys, attended whole, into the thin tail of decoded keys. The layer's open tail ends with
        this step's tokens (every earlier step moved its own); tokens before them there were appended whole after the
        prefill (:meth:`kvslim.cache.Cache.appended`, the query-agnostic question) and stay whole in a segment of
        their own."""
        channels = obs.layer.state.get("think")
        new = obs.layer.segments[-1]
        if not self.prune_decoded or channels is None or not isinstance(new, DenseSegment):
            return
        keys, values, valid = new.dense()
        appended = keys.shape[2] - obs.q_len
        before = obs.layer.segments[:-1]
        if appended:
            before = before + [DenseSegment.from_padded(keys[:, :, :appended], values[:, :, :appended],
                                                        valid[:, :, :appended])]
        keys, values = keys[:, :, appended:], values[:, :, appended:]
        if before and isinstance(before[-1], ChannelPrunedTail):
            before[-1].append(keys, values)
        else:
            tail = GrowingSegment.holding(keep_channels(keys, channels), values)
            before = before + [ChannelPrunedTail(tail, channels, keys.shape[-1])]
        obs.layer.replace(before)

    def storage_bytes(self, shape: KVShape, tokens: list[float]) -> int:
        kept = self.kept_channels(shape.head_dim)
        per_token = shape.num_kv_heads * (kept + shape.head_dim) * shape.element_bytes
        index = shape.num_layers * shape.num_kv_heads * kept * 2 if self.ratio else 0
        return int(round(sum(tokens) * per_token)) + index
