"""Where a layer's newest tokens are written: preallocated buffers, so decoding appends in place.

A layer's last segment receives every new token. Stored as exactly the kept rows (a
:class:`~kvslim.cache.segments.DenseSegment`), each append would rebuild the rows with ``torch.cat`` and copy the
whole layer on every decoding step, and build a padded copy for attention on top: that is what made the cache
slower than transformers' own. The tail lives instead in padded (B, H, capacity, D) buffers:

* :class:`GrowingSegment` (the default): every (sequence, head) holds the same ``filled`` tokens; an append writes
  in place, ``dense()`` hands out views, no allocation, copy or host sync until the room runs out and the
  buffers regrow geometrically (:func:`grown_capacity`).
* :class:`StaticSegment` (``kvslim.Cache(..., max_length=N)``): buffers of a fixed capacity whose ``dense()`` is
  always the whole buffer, with a mask built on the device from per-(sequence, head) lengths, and appends that
  scatter at each row's length. A decoding step then has the same shapes and no host sync every time, so
  ``torch.compile`` traces it as one graph (as transformers' ``StaticCache``). Rows may hold different counts
  (an eviction left heads ragged): padding is masked, never attended.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .segments import DenseSegment


def grown_capacity(needed: int) -> int:
    """Tokens a growing buffer reserves to hold ``needed``: an eighth more (and 64), so regrowing (a copy of what is
    held) happens once per ~needed/8 appended tokens and costs O(1) copied tokens per step amortized."""
    return needed + needed // 8 + 64


def _buffers(keys: Tensor, values: Tensor, room: int) -> tuple[Tensor, Tensor]:
    """Zeroed (B, H, room, D) buffers whose first columns hold (B, H, T, D) ``keys`` / ``values``."""
    batch, heads, length = keys.shape[:3]
    key_buffer = keys.new_zeros(batch, heads, room, keys.shape[-1])
    value_buffer = values.new_zeros(batch, heads, room, values.shape[-1])
    key_buffer[:, :, :length] = keys
    value_buffer[:, :, :length] = values
    return key_buffer, value_buffer


def _too_long(tokens: int, capacity: int) -> ValueError:
    return ValueError(f"the cache would hold {tokens} tokens per head, more than its max_length={capacity}: build "
                      "kvslim.Cache with a larger max_length")


class GrowingSegment(DenseSegment):
    """The open tail of a layer, every (sequence, head) holding ``filled`` tokens, in buffers with spare room.

    ``nbytes`` counts the held tokens; the spare room is at most an eighth more (plus 64 tokens), whether it lies
    after the held tokens or, after :meth:`drop`, before them.
    """

    def __init__(self, key_buffer: Tensor, value_buffer: Tensor, filled: int):
        self.key_buffer, self.value_buffer, self.filled = key_buffer, value_buffer, filled
        #: the buffer column of the oldest held token: :meth:`drop` advances it instead of moving what follows
        self.start = 0
        self._valid = torch.ones(key_buffer.shape[:3], dtype=torch.bool, device=key_buffer.device)
        self._lengths: tuple[int, Tensor] | None = None

    @classmethod
    def holding(cls, keys: Tensor, values: Tensor, room: int | None = None) -> "GrowingSegment":
        """A segment holding (B,H,T,D) ``keys``/``values`` in buffers of ``room`` tokens (grown room by default)."""
        length = keys.shape[2]
        return cls(*_buffers(keys, values, max(length, room or grown_capacity(length))), length)

    @property
    def capacity(self) -> int:
        return self.key_buffer.shape[2]

    @property
    def lengths(self) -> Tensor:  # type: ignore[override]
        """(B, H) ``filled`` everywhere; built only when asked for (decoding alone never asks)."""
        if self._lengths is None or self._lengths[0] != self.filled:
            batch, heads = self.key_buffer.shape[:2]
            self._lengths = (self.filled, torch.full((batch, heads), self.filled, dtype=torch.long,
                                                     device=self.key_buffer.device))
        return self._lengths[1]

    @property
    def keys(self) -> Tensor:  # type: ignore[override]
        """Held key rows (N, D) in (sequence, head, token) order, as :class:`DenseSegment` stores them (a copy)."""
        return self.dense()[0].reshape(-1, self.key_buffer.shape[-1])

    @property
    def values(self) -> Tensor:  # type: ignore[override]
        return self.dense()[1].reshape(-1, self.value_buffer.shape[-1])

    @property
    def uniform(self) -> bool:
        return True

    @property
    def longest(self) -> int:
        return self.filled

    @property
    def tokens(self) -> int:
        return self.filled * self.key_buffer.shape[0] * self.key_buffer.shape[1]

    def valid_mask(self) -> Tensor:
        return self._valid[:, :, : self.filled]

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        """Views of the buffers: callers must not write to them, and they hold the layer's tokens only until its next
        eviction (:meth:`keep_columns` and :meth:`drop` rewrite the buffers in place)."""
        start, end = self.start, self.start + self.filled
        return self.key_buffer[:, :, start:end], self.value_buffer[:, :, start:end], self._valid[:, :, : self.filled]

    def append(self, keys: Tensor, values: Tensor) -> "GrowingSegment":
        """Write q new tokens (B,H,q,D) after the held ones, in place while there is room."""
        held, end = self.start + self.filled, self.start + self.filled + keys.shape[2]
        if end > self.capacity:  # move to buffers with room: one copy of what is held per ~filled/8 tokens
            held_k, held_v, _ = self.dense()
            return GrowingSegment.holding(held_k, held_v, grown_capacity(self.filled + keys.shape[2])).append(keys,
                                                                                                             values)
        self.key_buffer[:, :, held:end] = keys
        self.value_buffer[:, :, held:end] = values
        self.filled += keys.shape[2]
        return self

    def keep_columns(self, index: Tensor, values: Tensor | None = None) -> None:
        """Keep, in every row, the held columns ``index`` (B,H,n, ascending): an eviction that leaves every row the
        same count, done in place (a gather into the first n columns), so the layer stays one open tail and no host
        sync, allocation of new buffers or ragged copy is made. ``values`` (B,H,filled,Dv), when given, are the held
        tokens' new values (merging methods)."""
        keys, held_values, _ = self.dense()
        source = held_values if values is None else values.to(held_values.dtype)
        count, where = index.shape[-1], index.unsqueeze(-1)
        kept_keys = keys.gather(2, where.expand(-1, -1, -1, keys.shape[-1]))
        kept_values = source.gather(2, where.expand(-1, -1, -1, source.shape[-1]))
        self.key_buffer[:, :, self.start : self.start + count] = kept_keys
        self.value_buffer[:, :, self.start : self.start + count] = kept_values
        self.filled = count

    def fitted(self) -> "GrowingSegment":
        """This segment, or its held tokens in new buffers when an eviction left the buffers larger than a growing tail
        of that many tokens reserves (a prefill that kept a quarter): the evicted room is given back, not kept."""
        if self.capacity - self.start <= grown_capacity(self.filled):
            return self
        return GrowingSegment.holding(*self.dense()[:2])

    def drop(self, first: int, stop: int) -> None:
        """Drop the held columns [first, stop) of every row (StreamingLLM's oldest tokens after its sinks): the
        ``first`` columns before them move ``stop - first`` columns on and the start advances, so only those few
        are copied, not the tokens that follow."""
        gap = stop - first
        if first:
            for buffer in (self.key_buffer, self.value_buffer):
                buffer[:, :, self.start + gap : self.start + stop] = buffer[:, :, self.start : self.start + first].clone()
        self.start += gap
        self.filled -= gap

    def nbytes(self) -> int:
        per_token = self.key_buffer.shape[-1] * self.key_buffer.element_size() \
            + self.value_buffer.shape[-1] * self.value_buffer.element_size()
        return self.tokens * per_token


class StaticSegment(DenseSegment):
    """Fixed (B, H, capacity, D) buffers; row (b, h) holds ``lengths[b, h]`` tokens in its first columns.

    ``lengths`` lives on the device and is updated in place, so a captured step keeps reading the same tensor.
    ``nbytes`` counts the whole buffers: static mode holds them from the start. ``filled`` is every row's count
    while they are all equal (known on the host without a sync), None once rows differ.

    A step traced by ``torch.compile`` counts on the device only: a host count that changed every step would be a
    symbolic input of the compiled graph, and CUDA graphs record a new graph for every value of one. The host
    counts are read back from ``lengths`` (one sync) the next time an eager caller needs them. A compiled step does
    not check for overflow (as transformers' ``StaticCache``): size ``max_length`` for the whole generation.
    """

    def __init__(self, key_buffer: Tensor, value_buffer: Tensor, lengths: Tensor, filled: int | None, bound: int):
        self.key_buffer, self.value_buffer, self.lengths, self._filled = key_buffer, value_buffer, lengths, filled
        self._bound = bound  # no row holds more: overflow is checked on the host without reading ``lengths``
        self._counts_stale = False  # compiled steps appended since the host counts were last right
        self._slots = torch.arange(key_buffer.shape[2], device=key_buffer.device)
        if not torch.compiler.is_compiling():  # written in place by captured steps: CUDA graphs keep their address
            for tensor in (key_buffer, value_buffer, lengths, self._slots):
                torch._dynamo.mark_static_address(tensor)

    @classmethod
    def holding(cls, keys: Tensor, values: Tensor, valid: Tensor | None, capacity: int) -> "StaticSegment":
        """A segment of ``capacity`` tokens per row holding padded (B,H,T,D) ``keys``/``values``: rows are
        left-aligned, ``valid`` (B,H,T) marks the held tokens (None: all T of them)."""
        batch, heads, length = keys.shape[:3]
        if length > capacity:
            raise _too_long(length, capacity)
        if valid is None:
            lengths = torch.full((batch, heads), length, dtype=torch.long, device=keys.device)
            return cls(*_buffers(keys, values, capacity), lengths, length, length)
        keys, values = keys * valid[..., None], values * valid[..., None]  # padding holds zeros, never stale rows
        return cls(*_buffers(keys, values, capacity), valid.sum(-1), None, length)

    @classmethod
    def buffering(cls, segment: DenseSegment, capacity: int) -> "StaticSegment":
        """The tokens of ``segment`` (ragged rows or a growing tail) in static buffers."""
        keys, values, valid = segment.dense()
        return cls.holding(keys, values, None if segment.uniform else valid, capacity)

    @property
    def capacity(self) -> int:
        return self.key_buffer.shape[2]

    @property
    def keys(self) -> Tensor:  # type: ignore[override]
        """Held key rows (N, D) in (sequence, head, token) order, as :class:`DenseSegment` stores them (a copy)."""
        return self.key_buffer[self.valid_mask()]

    @property
    def values(self) -> Tensor:  # type: ignore[override]
        return self.value_buffer[self.valid_mask()]

    @property
    def filled(self) -> int | None:
        self._refresh_counts()
        return self._filled

    def _refresh_counts(self) -> None:
        """After compiled steps (see the class): the host counts from ``lengths``, a sync; rows stay as uniform as
        they were (every row gained the same tokens)."""
        if self._counts_stale:
            self._bound = int(self.lengths.max())
            self._filled = None if self._filled is None else self._bound
            self._counts_stale = False

    @property
    def uniform(self) -> bool:
        return self.filled is not None

    @property
    def longest(self) -> int:
        """The width of this segment in the layer's dense layout: the whole buffer."""
        return self.capacity

    def valid_mask(self) -> Tensor:
        return self._slots < self.lengths.unsqueeze(-1)

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        """The whole buffers (callers must not write to them) and the held tokens' mask."""
        return self.key_buffer, self.value_buffer, self.valid_mask()

    def append(self, keys: Tensor, values: Tensor) -> "StaticSegment":
        """Write q new tokens (B,H,q,D) after each row's held ones: a scatter at device-side positions, so every
        decoding step runs the same operations on the same tensors."""
        batch, heads, q_len = keys.shape[:3]
        compiled = torch.compiler.is_compiling()
        if not compiled:
            self._refresh_counts()
            if self._bound + q_len > self.capacity:
                self._bound = int(self.lengths.max())  # a host sync, only near the end of the buffer
                if self._bound + q_len > self.capacity:
                    raise _too_long(self._bound + q_len, self.capacity)
        where = self.lengths[:, :, None, None]  # (B,H,q,1): a decoding step's one column needs no offsets
        if q_len > 1:
            where = where + torch.arange(q_len, device=keys.device)[:, None]
        self.key_buffer.scatter_(2, where.expand(batch, heads, q_len, keys.shape[-1]), keys)
        self.value_buffer.scatter_(2, where.expand(batch, heads, q_len, values.shape[-1]), values)
        self.lengths.add_(q_len)
        if compiled:
            self._counts_stale = True
        else:
            self._bound += q_len
            self._filled = None if self._filled is None else self._filled + q_len
        return self

    def nbytes(self) -> int:
        return self.key_buffer.numel() * self.key_buffer.element_size() \
            + self.value_buffer.numel() * self.value_buffer.element_size()
