"""A group of sequences' pages read back as one layer for a decode-time evictor: scored in place, never stored.

:class:`~kvslim.engine.decode_eviction.DecodeEviction` reads every layer of a group of sequences from the page pools
as one padded (rows, H, T, D) batch, rows left-aligned. The method evicts from it through the ``LayerKV`` interface
as from any cache, but nothing here copies or compacts the tokens: the batch holds the gathered tensors as they are
(:class:`PageRows`), answers :meth:`~PageBatch.fits` from the counts the host already knows, and only records what
``select`` keeps. The engine then writes the kept tokens back to the pages with one gather and one write per pool
(:meth:`PageBatch.compacted`). Building a cache layer instead (buffers with spare room, a ragged copy, boolean
indexing) copied every held token twice per step and waited for the device three times.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..cache.layer import LayerKV
from ..cache.segments import DenseSegment


class PageRows(DenseSegment):
    """Padded (B,H,T,D) keys and values, row (b, h) holding its first ``lengths[b, h]`` columns (on the device)."""

    def __init__(self, keys: Tensor, values: Tensor, lengths: Tensor):
        self.lengths = lengths
        self._dense = keys, values, torch.arange(keys.shape[2], device=keys.device) < lengths[..., None]

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        return self._dense

    @property
    def longest(self) -> int:
        return self._dense[0].shape[2]


class PageBatch(LayerKV):
    """The pages of a group as one layer (see the module docstring); ``held`` (B,H) its rows' counts on the host."""

    def __init__(self, keys: Tensor, values: Tensor, held: Tensor):
        super().__init__(0)  # every layer at once: a decode-time scorer's evict does not look at the layer index
        self.segments = [PageRows(keys, values, held.to(keys.device, non_blocking=True))]
        self.held = held
        self.kept: Tensor | None = None  # what the method's select keeps (B,H,T); None: nothing evicted
        self.kept_values: Tensor | None = None  # the kept tokens' new values (merging methods), over the layout
        self._limit: tuple[Tensor, Tensor] | None = None
        self._order: tuple[Tensor, Tensor] | None = None

    def know_limit(self, k: Tensor, host: Tensor) -> None:
        """``host`` is ``k`` (B,H) read on the host: :meth:`fits` then compares against it without a sync."""
        self._limit = k, host

    @property
    def host_limit(self) -> Tensor | None:
        """The limit given to :meth:`know_limit`, on the host."""
        return None if self._limit is None else self._limit[1]

    def fits(self, k: Tensor) -> bool:
        if self._limit is not None and self._limit[0] is k:
            return bool((self.held <= self._limit[1]).all())
        return super().fits(k)

    def select(self, keep: Tensor, values: Tensor | None = None, width: int | None = None) -> None:
        """Record the choice; the engine writes it back to the pages (:meth:`compacted`)."""
        self.kept, self.kept_values = keep, values

    def order(self, keep: Tensor) -> Tensor:
        """(B,H,T) the column each slot takes after keeping ``keep``: the kept columns in time order (as ``select``
        lays them out), then every slot past them its own column (an unchanged write). Cached for one ``keep``."""
        if self._order is None or self._order[0] is not keep:
            length = keep.shape[-1]
            target = torch.where(keep, keep.long().cumsum(-1) - 1, length)  # dropped columns go to a spare slot
            source = torch.arange(length + 1, device=keep.device).expand(*keep.shape[:2], -1).contiguous()
            source.scatter_(-1, target, torch.arange(length, device=keep.device).expand_as(target))
            self._order = keep, source[..., :length]
        return self._order[1]

    def compact_like(self, x: Tensor, keep: Tensor) -> Tensor:
        """``x`` (B,H,T,...) laid out as ``select(keep)`` lays out the tokens, zero past the kept ones; T wide."""
        source = self.order(keep).view(*keep.shape, *(1,) * (x.dim() - 3))
        moved = x.gather(2, source.expand_as(x))
        kept = torch.arange(keep.shape[-1], device=keep.device) < keep.sum(-1, keepdim=True)
        return torch.where(kept.view(*keep.shape, *(1,) * (x.dim() - 3)), moved, torch.zeros((), dtype=x.dtype,
                                                                                                device=x.device))

    def compacted(self, columns: Tensor | None) -> tuple[Tensor, Tensor]:
        """Keys and values (B,H,T,D) after the recorded eviction: slot t of a row holds what :meth:`order` puts there.
        ``columns`` (B,T) maps each slot to the slot whose content it takes (None: its own): padding columns that
        read the same page as a real one take that one's content, so every page gets one value."""
        keys, values, _ = self.segments[0].dense()
        source = self.order(self.kept)  # type: ignore[arg-type]
        if columns is not None:
            source = source.gather(-1, columns[:, None].expand_as(source))
        if self.kept_values is not None:
            values = self.kept_values.to(values.dtype)
        where = source[..., None]
        return (keys.gather(2, where.expand(*source.shape, keys.shape[-1])),
                values.gather(2, where.expand(*source.shape, values.shape[-1])))
