"""How kept tokens are stored: segments of a layer's KV cache.

A layer's cache is an ordered list of segments (oldest first). Every segment holds, for each
(sequence, KV head), its own number of tokens: eviction can leave heads and sequences with
different lengths, and a segment stores exactly the kept rows (ragged, no padding), so the bytes
held shrink with what is dropped. Attention reads a segment through ``dense()``, a padded working
copy that lives only while one layer attends.

Other storage formats (quantized codes, pruned key channels) subclass :class:`Segment`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


def ragged_to_padded(rows: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Scatter rows ordered by (batch, head, token) into a padded (B, H, T, ...) tensor and its valid mask."""
    batch, heads = lengths.shape
    longest = int(lengths.max()) if lengths.numel() else 0
    valid = torch.arange(longest, device=lengths.device) < lengths.unsqueeze(-1)
    if rows.shape[0] == batch * heads * longest:  # uniform lengths: a free view
        return rows.view(batch, heads, longest, *rows.shape[1:]), valid
    padded = rows.new_zeros(batch, heads, longest, *rows.shape[1:])
    padded[valid] = rows
    return padded, valid


class Segment(ABC):
    """A run of cached tokens for one layer, ragged per (sequence, KV head)."""

    lengths: Tensor  # (B, H) int64: tokens held per sequence and KV head

    @abstractmethod
    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        """Padded keys (B,H,T,D), values (B,H,T,Dv) in the compute dtype and the valid mask (B,H,T)."""

    @abstractmethod
    def select(self, keep: Tensor) -> "Segment":
        """A segment holding only the tokens where ``keep`` (B,H,T over the dense layout) is True."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes this segment actually holds in memory (codes, scales, indices: everything)."""

    def nbytes_per_sequence(self) -> list[int]:
        """Bytes per sequence of the batch, shared out by tokens held (exact for per-token storage)."""
        per_seq = self.lengths.sum(-1).tolist()
        total = sum(per_seq)
        return [self.nbytes() * n // total if total else 0 for n in per_seq]

    @property
    def longest(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    @property
    def tokens(self) -> int:
        """Tokens held, summed over sequences and heads."""
        return int(self.lengths.sum())


class DenseSegment(Segment):
    """Keys and values in the model's dtype, stored as exactly the kept rows."""

    def __init__(self, keys: Tensor, values: Tensor, lengths: Tensor):
        self.keys, self.values, self.lengths = keys, values, lengths

    @classmethod
    def from_padded(cls, keys: Tensor, values: Tensor, keep: Tensor | None = None) -> "DenseSegment":
        """Store (B,H,T,D) keys/values, keeping only rows where ``keep`` is True (all rows when None)."""
        batch, heads, length = keys.shape[:3]
        if keep is None:
            lengths = torch.full((batch, heads), length, dtype=torch.long, device=keys.device)
            return cls(keys.reshape(-1, keys.shape[-1]), values.reshape(-1, values.shape[-1]), lengths)
        return cls(keys[keep], values[keep], keep.sum(-1))

    @classmethod
    def empty_like(cls, keys: Tensor, values: Tensor) -> "DenseSegment":
        batch, heads = keys.shape[:2]
        lengths = torch.zeros(batch, heads, dtype=torch.long, device=keys.device)
        return cls(keys.new_empty(0, keys.shape[-1]), values.new_empty(0, values.shape[-1]), lengths)

    @property
    def uniform(self) -> bool:
        return bool((self.lengths == self.lengths.flatten()[0]).all()) if self.lengths.numel() else True

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        keys, valid = ragged_to_padded(self.keys, self.lengths)
        values, _ = ragged_to_padded(self.values, self.lengths)
        return keys, values, valid

    def append(self, keys: Tensor, values: Tensor) -> "DenseSegment":
        """Add q new tokens (B,H,q,D) to every row; only the open (uniform) tail segment grows."""
        old_k, old_v, _ = self.dense()
        return DenseSegment.from_padded(torch.cat([old_k, keys], 2), torch.cat([old_v, values], 2))

    def select(self, keep: Tensor) -> "DenseSegment":
        keys, values, valid = self.dense()
        return DenseSegment.from_padded(keys, values, keep & valid)

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
