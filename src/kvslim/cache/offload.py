"""Keeping part of a layer's cache in host memory and reading back only the rows a step needs.

Offloading segments keep something small on the device to *rank* tokens for the current query
(the exact keys for KCache, product-quantization codes for PQCache), keep the bulky rest in host
memory (pinned when CUDA is available, so copies back are asynchronous), and attend through the
partial-attention protocol (:meth:`Segment.attend`): score every held token, keep the top N per KV
head, copy only those rows to the device and attend over them. The cache merges that partial result
with the other segments' (e.g. the recent tokens still on the device) by log-sum-exp.

Host rows are ragged like every segment's: ordered by (sequence, KV head, token), ``lengths`` per
(sequence, KV head); the helpers below index them without ever building a padded host copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .segments import DenseSegment, Segment, group_rows, grouped_logits, ragged_to_padded, softmax_partial


def to_host(t: Tensor) -> Tensor:
    """``t`` in host memory, pinned when CUDA is available so that copies back can be ``non_blocking``."""
    if not torch.cuda.is_available() or t.is_pinned():
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out


def fetch_rows(host: Tensor, index: Tensor, device: torch.device) -> Tensor:
    """Rows ``index`` of a 2-D host tensor, on ``device``.

    On a GPU that maps pinned memory, a kernel reads the rows over PCIe itself (zero copy, see
    :mod:`kvslim.kernels.host_gather`): nothing waits for the row numbers to reach the host. Elsewhere,
    :func:`copy_rows`.
    """
    if device.type == "cuda" and host.is_pinned() and _zero_copy(host, device):
        from ..kernels.host_gather import gather_rows

        return gather_rows(host, index.to(device), device)
    return copy_rows(host, index, device)


def _zero_copy(host: Tensor, device: torch.device) -> bool:
    try:
        from ..kernels import host_gather
    except ImportError:  # no Triton
        return False
    return host_gather.supports(host) and host_gather.zero_copy_works(device)


def copy_rows(host: Tensor, index: Tensor, device: torch.device) -> Tensor:
    """Rows ``index`` of a host tensor, on ``device``, through the host: the staged path.

    From pinned memory the rows are gathered into a pinned staging buffer and copied asynchronously;
    PyTorch's pinned-memory allocator keeps that buffer alive until the copy has run. The row numbers
    must be on the host first: from a GPU, that waits for the kernels that chose them.
    """
    index = index.reshape(-1).to(host.device)
    if device.type == "cpu" or not host.is_pinned():
        return host.index_select(0, index).to(device)
    staging = torch.empty((index.numel(), *host.shape[1:]), dtype=host.dtype, pin_memory=True)
    torch.index_select(host, 0, index, out=staging)
    return staging.to(device, non_blocking=True)


def _starts(lengths: Tensor) -> Tensor:
    """(B, H) index of each (sequence, KV head)'s first row in a ragged row tensor."""
    flat = lengths.flatten()
    return (flat.cumsum(0) - flat).view_as(lengths)


def row_index(lengths: Tensor, index: Tensor) -> Tensor:
    """Flat row numbers (B,H,k) of token columns ``index`` (B,H,k) in ragged rows; clamped into range.

    Columns past a row's length (picked only when it holds fewer than k tokens) land on a real row;
    callers mask them out.
    """
    last = (lengths - 1).clamp(min=0).unsqueeze(-1)
    flat = _starts(lengths).unsqueeze(-1) + torch.minimum(index, last)
    return flat.clamp(0, max(int(lengths.sum()) - 1, 0))


def _destinations(lengths: Tensor, start: Tensor) -> Tensor:
    """Positions ``start[b,h] + 0 .. lengths[b,h]-1``, concatenated in (b, h) order."""
    flat, begin = lengths.flatten(), start.flatten()
    offsets = torch.arange(int(flat.sum()), device=lengths.device) - torch.repeat_interleave(_starts(lengths).flatten(), flat)
    return torch.repeat_interleave(begin, flat) + offsets


def concat_ragged(first: Tensor, first_lengths: Tensor, second: Tensor, second_lengths: Tensor) -> Tensor:
    """Ragged rows holding, for every (sequence, KV head), ``first``'s tokens and then ``second``'s.

    The result lives where ``first`` does, pinned if either input is (an empty tensor never reports pinned).
    """
    start = _starts(first_lengths + second_lengths)
    out = torch.empty((first.shape[0] + second.shape[0], *first.shape[1:]), dtype=first.dtype, device=first.device,
                      pin_memory=first.is_pinned() or second.is_pinned())
    out[_destinations(first_lengths, start).to(out.device)] = first
    out[_destinations(second_lengths, start + first_lengths).to(out.device)] = second.to(out.device, out.dtype)
    return out


def kept_rows(lengths: Tensor, keep: Tensor) -> Tensor:
    """Boolean over ragged rows: which rows ``keep`` (B,H,T over the padded layout) retains."""
    valid = torch.arange(keep.shape[-1], device=keep.device) < lengths.unsqueeze(-1)
    return (keep & valid)[valid]


@dataclass(frozen=True)
class TopN:
    """How many tokens per (sequence, KV head) a decoding step reads: ``n`` tokens or a ``fraction`` of those held."""

    n: int | None = None
    fraction: float | None = None

    def __call__(self, lengths: Tensor) -> Tensor:
        if self.n is not None:
            return lengths.clamp(max=self.n)
        return torch.minimum(torch.ceil(lengths * self.fraction).long().clamp(min=1), lengths)


def top_per_kv_head(logits: Tensor, allowed: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """The ``n`` (B,H) tokens per KV head that its query rows attend to most: columns (B,H,k) and a kept mask.

    ``logits`` and ``allowed`` are (B,H,R,T) with R = the G query heads of the group times the queries
    of the step. A token's score is its *largest* softmax probability over those rows (max over the
    group, not a union of per-head top-N): one shared set of N tokens per KV head keeps the rows copied
    from the host at N whatever the group size (a union could need up to G*N), and probabilities,
    unlike raw logits, are comparable across heads. ``k = max(n)``; columns beyond a row's own ``n`` or
    never allowed are marked not kept. Ties go to the earlier column (a stable sort, where ``topk`` leaves
    the order open): PQ codes tie often, and the choice must not depend on how wide the layout is padded
    (the engine's pages are wider than the Hugging Face layout).
    """
    masked = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(masked, -1, keepdim=True)
    probs = torch.exp(masked - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    score = probs.amax(2).masked_fill(~allowed.any(2), -1.0)
    k = min(int(n.max()) if n.numel() else 0, score.shape[-1])
    top = score.sort(dim=-1, descending=True, stable=True)
    values, index = top.values[..., :k], top.indices[..., :k]
    kept = (torch.arange(k, device=n.device) < n.unsqueeze(-1)) & (values >= 0)
    return index, kept


def attend_selected(query: Tensor, logits: Tensor, rows_allowed: Tensor, index: Tensor, kept: Tensor,
                    values: Tensor) -> tuple[Tensor, Tensor]:
    """Exact partial attention over the selected tokens only, as the :meth:`Segment.attend` pair.

    ``logits`` (B,H,R,k) and ``values`` (B,H,k,Dv) are those of the tokens at columns ``index`` (B,H,k);
    ``rows_allowed`` (B,H,R,T) is the grouped mask over the segment's columns.
    """
    batch, q_heads, q_len, _ = query.shape
    picked = rows_allowed.gather(-1, index.unsqueeze(2).expand(*rows_allowed.shape[:3], -1))
    out, lse = softmax_partial(logits, picked & kept.unsqueeze(2), values)
    return out.reshape(batch, q_heads, q_len, -1), lse.reshape(batch, q_heads, q_len)


class KCacheSegment(Segment):
    """KCache storage: keys on the device, values in host memory; a step copies the values of its top N tokens.

    Exact q·K over every held token picks, per KV head, the N tokens with the largest attention
    probability (see :func:`top_per_kv_head`); attention is the softmax over those N only.
    """

    def __init__(self, keys: Tensor, values: Tensor, lengths: Tensor, top: TopN):
        self.keys, self.values, self.lengths, self.top = keys, values, lengths, top

    @classmethod
    def offload(cls, seg: DenseSegment, top: TopN) -> "KCacheSegment":
        return cls(seg.keys, to_host(seg.values), seg.lengths, top)

    def absorb(self, seg: DenseSegment) -> "KCacheSegment":
        """This segment plus ``seg``'s tokens after its own (per sequence and head): their values go to the host."""
        keys = concat_ragged(self.keys, self.lengths, seg.keys, seg.lengths)
        values = concat_ragged(self.values, self.lengths, to_host(seg.values), seg.lengths)
        return KCacheSegment(keys, values, self.lengths + seg.lengths, self.top)

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        keys, valid = ragged_to_padded(self.keys, self.lengths)
        values, _ = ragged_to_padded(fetch_rows(self.values, torch.arange(self.values.shape[0]), keys.device),
                                     self.lengths)
        return keys, values, valid

    def select(self, keep: Tensor) -> "KCacheSegment":
        rows = kept_rows(self.lengths, keep)
        lengths = (keep & self.valid_mask()).sum(-1)
        return KCacheSegment(self.keys[rows], to_host(self.values[rows.to(self.values.device)]), lengths, self.top)

    def attend(self, query: Tensor, allowed: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        keys, _ = ragged_to_padded(self.keys, self.lengths)
        batch, heads = self.lengths.shape
        logits = grouped_logits(query, keys, scaling)
        rows_allowed = group_rows(allowed, query.shape[1] // heads)
        index, kept = top_per_kv_head(logits, rows_allowed, self.top(self.lengths))
        values = fetch_rows(self.values, row_index(self.lengths, index), keys.device)
        values = values.view(batch, heads, index.shape[-1], self.values.shape[-1])
        picked = logits.gather(-1, index.unsqueeze(2).expand(*logits.shape[:3], -1))
        return attend_selected(query, picked, rows_allowed, index, kept, values)

    def device_nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size()

    def host_nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    def nbytes(self) -> int:
        return self.device_nbytes() + self.host_nbytes()
