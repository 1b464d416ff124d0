"""Quest storage for ``kvslim.Cache``: every key and value, plus each page's key minimum and maximum.

A :class:`QuestSegment` is a dense segment (every token kept, nothing saved) that also holds, per
(sequence, KV head), the element-wise minimum and maximum of the keys of each page of ``page``
consecutive tokens of its row. Pages are fixed positions of the row (tokens ``[p * page, (p + 1) * page)``),
as the engine's blocks are, so both paths bound and select the same pages.

How the query reaches the selection: a segment that overrides :meth:`Segment.attend` is attended by
itself, with the step's queries (``Cache.attend`` then merges every segment's partial attention), so no
hook on the attention module is needed. At a decoding step (one query) the segment bounds its pages for
that query (:func:`kvslim.kernels.quest_ref.page_bounds`), picks the pages to read
(:func:`kvslim.kernels.quest_ref.force_pages`, :func:`kvslim.kernels.quest_ref.pick_pages`), gathers only
their keys and values and attends over them.
The step's own token is still in the layer's open tail segment, attended in full and merged; its page
counts as the newest page, always read, and the method folds the tail into this segment right after.
Prompt chunks (several queries) attend over every token: Quest is a decoding-time method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.quest_ref import force_pages, page_bounds, pick_pages
from .offload import concat_ragged
from .segments import DenseSegment, partial_attention, ragged_to_padded


def page_extrema(keys: Tensor, valid: Tensor, page: int) -> tuple[Tensor, Tensor]:
    """Key minimum and maximum (B, H, ceil(T / page), D) of each page of padded keys (B, H, T, D); only ``valid``
    tokens count, and a page with none gets zeros."""
    batch, heads, length, dim = keys.shape
    pad = -length % page
    keys, valid = F.pad(keys, (0, 0, 0, pad)), F.pad(valid, (0, pad))
    keys = keys.view(batch, heads, -1, page, dim)
    held = valid.view(batch, heads, -1, page, 1)
    low = keys.masked_fill(~held, float("inf")).amin(3)
    high = keys.masked_fill(~held, float("-inf")).amax(3)
    some = held.any(3)
    return torch.where(some, low, 0.0).to(keys.dtype), torch.where(some, high, 0.0).to(keys.dtype)


class QuestSegment(DenseSegment):
    """Every token's key and value (ragged rows, as :class:`DenseSegment`) and per-page key extrema (B, H, N, D)."""

    def __init__(self, keys: Tensor, values: Tensor, lengths: Tensor, kmin: Tensor, kmax: Tensor, page: int,
                 top: int, sinks: int):
        super().__init__(keys, values, lengths)
        self.kmin, self.kmax, self.page, self.top, self.sinks = kmin, kmax, page, top, sinks

    @classmethod
    def build(cls, segment: DenseSegment, page: int, top: int, sinks: int) -> "QuestSegment":
        """The tokens of ``segment`` with their pages' extrema."""
        keys, _, valid = segment.dense()
        kmin, kmax = page_extrema(keys, valid, page)
        return cls(segment.keys, segment.values, segment.lengths, kmin, kmax, page, top, sinks)

    def extend(self, tail: DenseSegment) -> "QuestSegment":
        """This segment followed, row by row, by ``tail``'s tokens. Only the pages from the shortest row's last
        page on can change: their extrema are recomputed, the others kept."""
        lengths = self.lengths + tail.lengths
        keys = concat_ragged(self.keys, self.lengths, tail.keys, tail.lengths)
        values = concat_ragged(self.values, self.lengths, tail.values, tail.lengths)
        first = int(self.lengths.min()) // self.page if self.lengths.numel() else 0
        padded, valid = ragged_to_padded(keys, lengths)
        low, high = page_extrema(padded[:, :, first * self.page :], valid[:, :, first * self.page :], self.page)
        kmin = torch.cat([self.kmin[:, :, :first], low], 2)
        kmax = torch.cat([self.kmax[:, :, :first], high], 2)
        return QuestSegment(keys, values, lengths, kmin, kmax, self.page, self.top, self.sinks)

    def select(self, keep: Tensor) -> DenseSegment:
        """Evicting tokens moves the others between pages: the result is plain, and Quest rebuilds its extrema."""
        return DenseSegment.select(self, keep)

    def selected_pages(self, query: Tensor) -> Tensor:
        """Pages (B, H, k) each KV head reads for one query (B, Hq, 1, D): the best of this segment's pages and the
        newest one, which holds the token being decoded (its page index is the row's length // page)."""
        batch, q_heads, _, dim = query.shape
        heads = self.lengths.shape[1]
        newest = self.lengths // self.page
        width = int(newest.max()) + 1
        pad = (0, 0, 0, width - self.kmin.shape[2])
        grouped = query.view(batch, heads, q_heads // heads, dim)
        bounds = page_bounds(grouped, F.pad(self.kmin, pad), F.pad(self.kmax, pad))
        return pick_pages(force_pages(bounds, newest, self.sinks), self.top)

    def attend(self, query: Tensor, allowed: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        if query.shape[2] != 1:
            return super().attend(query, allowed, scaling)
        selected = self.selected_pages(query)  # (B, H, k)
        keys, values, _ = self.dense()
        batch, heads, length = keys.shape[:3]
        count = selected.shape[-1]
        width = max(int(selected.max()) + 1, -(-length // self.page))
        pad = width * self.page - length
        picked = selected.clamp(min=0)

        def gather(x: Tensor) -> Tensor:  # (B, H, T, ...) -> the selected pages' rows (B, H, k * page, ...)
            x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad)).view(batch, heads, width, self.page, *x.shape[3:])
            index = picked.view(batch, heads, count, *[1] * (x.dim() - 3)).expand(-1, -1, -1, *x.shape[3:])
            return x.gather(2, index).flatten(2, 3)

        visible = gather(allowed[:, :, 0]) & (selected >= 0).repeat_interleave(self.page, -1)
        return partial_attention(query, gather(keys), gather(values), visible[:, :, None], scaling)

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for t in (self.kmin, self.kmax))
