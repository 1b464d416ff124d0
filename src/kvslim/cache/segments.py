"""How kept tokens are stored: segments of a layer's KV cache.

A layer's cache is an ordered list of segments (oldest first). Every segment holds, for each
(sequence, KV head), its own number of tokens: eviction can leave heads and sequences with
different lengths, and a segment stores exactly the kept rows (ragged, no padding), so the bytes
held shrink with what is dropped. Attention reads a segment through ``dense()``, a padded working
copy that lives only while one layer attends.

A segment may instead attend by itself (:meth:`Segment.attend`): it returns its *partial* attention,
the softmax-weighted values over its own tokens and their log-sum-exp, and the cache merges the
partials of a layer's segments exactly (:func:`merge_partials`). Segments that keep part of their
data off the device use this to read only the rows a query needs instead of a whole dense copy.

Other storage formats (quantized codes, pruned key channels) subclass :class:`Segment`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


def ragged_to_padded(rows: Tensor, lengths: Tensor, longest: int | None = None) -> tuple[Tensor, Tensor]:
    """Scatter rows ordered by (batch, head, token) into a padded (B, H, T, ...) tensor and its valid mask.

    ``longest``: ``lengths.max()`` when the caller knows it (reading it is a host sync). The rows are gathered with
    an index of known size, not written through the mask (a boolean index is one more host sync)."""
    batch, heads = lengths.shape
    if longest is None:
        longest = int(lengths.max()) if lengths.numel() else 0
    valid = torch.arange(longest, device=lengths.device) < lengths.unsqueeze(-1)
    if rows.shape[0] == batch * heads * longest:  # uniform lengths: a free view
        return rows.view(batch, heads, longest, *rows.shape[1:]), valid
    if rows.shape[0] == 0:
        return rows.new_zeros(batch, heads, longest, *rows.shape[1:]), valid
    starts = lengths.flatten().cumsum(0).view(batch, heads) - lengths  # each row's first entry in ``rows``
    source = (starts.unsqueeze(-1) + torch.arange(longest, device=lengths.device)).clamp(max=rows.shape[0] - 1)
    padded = rows[source]
    fill = valid.view(*valid.shape, *([1] * (rows.dim() - 1)))
    return torch.where(fill, padded, torch.zeros((), dtype=rows.dtype, device=rows.device)), valid


def kept_positions(keep: Tensor, count: int) -> Tensor:
    """Flat positions (``count``,) of the True entries of ``keep`` in order, ``count`` their number known on the
    host: what ``keep.flatten().nonzero()`` gives, without the host reading the size back from the device."""
    flat = keep.flatten()
    slot = torch.where(flat, flat.long().cumsum(0) - 1, count)  # dropped entries land in a spare last slot
    positions = torch.empty(count + 1, dtype=torch.long, device=keep.device)
    return positions.scatter_(0, slot, torch.arange(flat.numel(), device=keep.device))[:count]


def grouped_logits(query: Tensor, keys: Tensor, scaling: float) -> Tensor:
    """Scaled float32 logits (B,H,G*q,T) of (B,Hq,q,D) queries against (B,H,T,D) keys, grouped per KV head.

    Query head ``h * G + g`` reads KV head ``h`` (the layout ``repeat_interleave`` gives), so the G query
    heads of a group become G*q rows of their KV head and no key is ever repeated.
    """
    batch, q_heads, q_len, dim = query.shape
    heads = keys.shape[1]
    rows = query.float().reshape(batch, heads, q_heads // heads * q_len, dim) * scaling  # scaled before: q*D, not q*T
    return rows @ keys.float().transpose(-1, -2)


def group_rows(allowed: Tensor, group: int) -> Tensor:
    """A (B,H,q,T) per-KV-head mask repeated for the G query heads of each group: (B,H,G*q,T)."""
    batch, heads, q_len, length = allowed.shape
    return allowed[:, :, None].expand(batch, heads, group, q_len, length).reshape(batch, heads, group * q_len, length)


def softmax_partial(logits: Tensor, allowed: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Attention restricted to ``allowed`` keys: (out (B,H,R,Dv), lse (B,H,R)), both float32.

    ``logits`` and ``allowed`` are (B,H,R,T), ``values`` (B,H,T,Dv). A row with no allowed key has
    ``lse = -inf`` and ``out = 0``, so it weighs nothing when partials are merged.
    """
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(logits - shift.unsqueeze(-1)) @ values.float(), lse


def partial_attention(query: Tensor, keys: Tensor, values: Tensor, allowed: Tensor,
                      scaling: float) -> tuple[Tensor, Tensor]:
    """Partial attention of (B,Hq,q,D) queries over (B,H,T,D) keys and (B,H,T,Dv) values, mask (B,H,q,T).

    Returns out (B,Hq,q,Dv) and lse (B,Hq,q) in float32 (the :meth:`Segment.attend` contract).
    """
    batch, q_heads, q_len, _ = query.shape
    group = q_heads // keys.shape[1]
    out, lse = softmax_partial(grouped_logits(query, keys, scaling), group_rows(allowed, group), values)
    return out.reshape(batch, q_heads, q_len, -1), lse.reshape(batch, q_heads, q_len)


def merge_partials(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Combine partial attentions over disjoint key sets into the attention over their union.

    Each part's output is weighted by ``exp(lse_i - lse)`` where ``lse`` is the log-sum-exp of all
    parts: exactly the softmax over the union, whatever order the parts come in.
    """
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), 0)
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = sum(torch.exp(p[1] - shift).unsqueeze(-1) * p[0] for p in parts)
    return out, lse  # type: ignore[return-value]


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

    def device_nbytes(self) -> int:
        """Bytes held on the compute device; all of them unless the segment offloads part to the host."""
        return self.nbytes()

    def host_nbytes(self) -> int:
        """Bytes held in host memory (offloading segments); ``nbytes() == device_nbytes() + host_nbytes()``."""
        return 0

    def valid_mask(self) -> Tensor:
        """(B,H,T) True where a token is held: rows are left-aligned, as :func:`ragged_to_padded` lays them out.

        Derived from ``lengths`` alone, so a layer's mask is known without any dense copy.
        """
        return torch.arange(self.longest, device=self.lengths.device) < self.lengths.unsqueeze(-1)

    def attend(self, query: Tensor, allowed: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        """Partial attention of (B,Hq,q,D) queries over this segment's tokens where ``allowed`` (B,H,q,T).

        Returns out (B,Hq,q,Dv) and lse (B,Hq,q) in float32, to be merged with :func:`merge_partials`.
        This default reads the dense copy; segments that can avoid materialising it override this,
        and a layer holding such a segment attends segment by segment (see ``Cache.attend``).
        """
        keys, values, _ = self.dense()
        return partial_attention(query, keys, values, allowed, scaling)

    def nbytes_per_sequence(self, host: bool = False) -> list[int]:
        """Bytes (``host``: only those in host memory) per sequence of the batch, shared out by tokens held
        (exact for per-token storage)."""
        per_seq = self.lengths.sum(-1).tolist()
        total, held = sum(per_seq), self.host_nbytes() if host else self.nbytes()
        return [held * n // total if total else 0 for n in per_seq]

    @property
    def longest(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    @property
    def tokens(self) -> int:
        """Tokens held, summed over sequences and heads."""
        return int(self.lengths.sum())


class DenseSegment(Segment):
    """Keys and values in the model's dtype, stored as exactly the kept rows.

    ``counts``: (longest row, tokens held, whether every row is as long) when known on the host (see
    :meth:`from_padded`), so neither attention's dense copy nor the layer's bookkeeping reads ``lengths`` back.
    """

    _counts: tuple[int, int, bool] | None = None  # subclasses that update ``lengths`` in place never set it

    def __init__(self, keys: Tensor, values: Tensor, lengths: Tensor, counts: tuple[int, int, bool] | None = None):
        self.keys, self.values, self.lengths, self._counts = keys, values, lengths, counts

    @classmethod
    def from_padded(cls, keys: Tensor, values: Tensor, keep: Tensor | None = None,
                    width: int | None = None) -> "DenseSegment":
        """Store (B,H,T,D) keys/values, keeping only rows where ``keep`` is True (all rows when None).

        ``width``: every (sequence, head) keeps exactly this many tokens, known on the host (a uniform budget): the
        rows are gathered with no host sync. Otherwise the kept counts are read back once (one sync per call)."""
        batch, heads, length = keys.shape[:3]
        if keep is None:
            lengths = torch.full((batch, heads), length, dtype=torch.long, device=keys.device)
            counts = (length, batch * heads * length, True)
            return cls(keys.reshape(-1, keys.shape[-1]), values.reshape(-1, values.shape[-1]), lengths, counts)
        lengths = keep.sum(-1)
        if width is not None:
            counts = (width, batch * heads * width, True)
        else:
            per_row = lengths.flatten().tolist()
            counts = (max(per_row, default=0), sum(per_row), len(set(per_row)) <= 1)
        positions = kept_positions(keep, counts[1])  # (sequence, head, token) order, as ``keys[keep]`` gives
        index = positions // (heads * length), positions // length % heads, positions % length
        return cls(keys[index], values[index], lengths, counts)

    @property
    def uniform(self) -> bool:
        if self._counts is not None:
            return self._counts[2]
        return bool((self.lengths == self.lengths.flatten()[0]).all()) if self.lengths.numel() else True

    @property
    def longest(self) -> int:
        return self._counts[0] if self._counts is not None else super().longest

    @property
    def tokens(self) -> int:
        return self._counts[1] if self._counts is not None else super().tokens

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        longest = self.longest  # read once for keys and values
        keys, valid = ragged_to_padded(self.keys, self.lengths, longest)
        values, _ = ragged_to_padded(self.values, self.lengths, longest)
        return keys, values, valid

    def select(self, keep: Tensor) -> "DenseSegment":
        keys, values, valid = self.dense()
        return DenseSegment.from_padded(keys, values, keep & valid)

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
