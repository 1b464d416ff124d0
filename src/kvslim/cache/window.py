"""Sliding-window layers (Mistral, Phi-3, Gemma 2/3): which slot each held token came from, and the window.

A query at slot ``p`` of a sliding-window layer sees keys at slots ``(p - W, p]`` (transformers' rule;
slots count every token the layer has seen, batch padding included, as the model's own mask does).
After eviction a layer holds an arbitrary subset of its slots, so the window cannot be read off a
token's rank: :class:`SlotTracker` records the slot of every held token, in time order, per
(sequence, KV head). While the held tokens are exactly the newest slots of each row (no eviction
yet, or only the oldest tokens dropped) the slots are implied by the lengths and nothing is stored;
the first eviction that leaves a gap materialises them as int32, 4 bytes per held token and head,
counted in the layer's bytes (``_Layer.nbytes``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .segments import ragged_to_padded


class SlotTracker:
    """Slots of a layer's held tokens in time order, (B, H, N) int32, or ``None`` while they are the newest slots."""

    def __init__(self, window: int):
        self.window = window
        self.slots: Tensor | None = None

    def nbytes(self) -> int:
        return 0 if self.slots is None else self.slots.numel() * self.slots.element_size()

    def in_time_order(self, lengths: Tensor, seen: int) -> Tensor:
        """(B, H, N) slot of the held token of each time rank; entries past a row's length are meaningless."""
        if self.slots is not None:
            return self.slots
        rank = torch.arange(int(lengths.max()), device=lengths.device)
        return (seen - lengths.unsqueeze(-1) + rank).to(torch.int32)

    def appended(self, lengths: Tensor, first: int, count: int) -> None:
        """Record ``count`` new tokens at slots ``first...`` after each row's ``lengths`` (B, H) held tokens."""
        if self.slots is None:
            return  # still the newest slots
        batch, heads, width = self.slots.shape
        grown = self.slots.new_full((batch, heads, width + count), -1)
        grown[:, :, :width] = self.slots
        step = torch.arange(count, device=lengths.device)
        new = (first + step).to(torch.int32).expand(batch, heads, count)
        self.slots = grown.scatter_(2, lengths.unsqueeze(-1) + step, new)

    def selected(self, valid: Tensor, keep: Tensor, lengths: Tensor, seen: int) -> None:
        """Follow ``LayerKV.select(keep)``: ``valid`` and ``keep`` are (B, H, T) over the layer's dense layout."""
        slots = self.in_time_order(lengths, seen)
        width = slots.shape[-1]
        rank = torch.where(valid, valid.long().cumsum(-1) - 1, width)  # invalid columns go to a spare rank
        kept = torch.zeros(*slots.shape[:2], width + 1, dtype=torch.bool, device=keep.device)
        kept = kept.scatter_(2, rank, keep & valid)[..., :width]
        count = kept.sum(-1)
        if self.slots is None:
            span = torch.arange(width, device=keep.device)
            newest = (span >= (lengths - count).unsqueeze(-1)) & (span < lengths.unsqueeze(-1))
            if bool((kept == newest).all()):
                return  # only the oldest tokens went: the kept ones are still the newest slots
        self.slots = ragged_to_padded(slots[kept], count)[0]

    def column_slots(self, valid: Tensor, lengths: Tensor, seen: int) -> Tensor:
        """(B, H, T) slot of each column of the dense layout whose valid mask is ``valid``."""
        rank = (valid.long().cumsum(-1) - 1).clamp(min=0)
        return self.in_time_order(lengths, seen).gather(2, rank)

    def allowed(self, valid: Tensor, lengths: Tensor, seen: int, q_len: int) -> Tensor:
        """(B, H, q, T): which columns lie inside the window of each of the last ``q_len`` queries."""
        slots = self.column_slots(valid, lengths, seen)
        query_slots = torch.arange(seen - q_len, seen, device=valid.device)
        return slots[:, :, None, :] > (query_slots - self.window)[:, None]

    def expired(self, valid: Tensor, lengths: Tensor, seen: int) -> Tensor:
        """(B, H, T) held tokens that no later query can see: all but the newest ``W - 1`` slots."""
        return valid & (self.column_slots(valid, lengths, seen) <= seen - self.window)
