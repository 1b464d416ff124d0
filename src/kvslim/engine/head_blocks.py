"""Head-blocks: the block manager of :class:`~kvslim.engine.head_kv.HeadKV`, where a block is ``block_size`` tokens of
one (layer, KV head).

Each running sequence holds a row of the store's tables ``(rows, L, H, width)``; the manager keeps the host copy of
its rows, writes each change to the device copy the store reads, and counts, admits and frees in head-blocks. A
sequence's ``block_table`` is its *virtual* table ``[row * width + j for j < blocks of its longest head]`` (what the
runner turns into slots; the store resolves them per head), and its ``peak_blocks`` counts head-blocks.

Admission and the scheduler's headroom ask for slots as for dense blocks: ``blocks_for(slots)`` is then a block of
``slots`` for every (layer, KV head), so a prefill is admitted with room for its whole prompt in every head (as
the dense layout admits per-head policies), and :meth:`trim` then gives back, per head, the blocks past what it
kept. Each decoded token adds a slot to every head, so a step takes a block only for the heads whose last block is
full.

Decoding adds blocks to a few heads of many sequences per step: those table entries are collected and sent to the
device in one copy per step (:meth:`HeadBlockManager.flush`, which the scheduler calls once it has made every
sequence's next slot writable): a small host-to-device copy per sequence would make the host wait for the device's
queue each time (25 ms a step at 110 sequences on an H200).

Forks (``n`` completions of a prompt) share the prompt's head-blocks by reference count; a head whose next slot
lies in a shared block gets a copy first (copy-on-write, head by head: the caller performs the copies returned).
Prefix sharing and KV tiers are not supported here: the engine keeps the dense layout for them.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import Tensor

from .block_manager import FreeBlocks
from .sequence import Sequence


class HeadBlockManager(FreeBlocks):
    """Hands out head-blocks and table rows to sequences and takes them back."""

    def __init__(self, num_blocks: int, block_size: int, rows: int, tables: Tensor):
        self.num_blocks, self.block_size, self.rows = num_blocks, block_size, rows
        self.tables = tables  # (rows, L, H, width) int32 on the device: what the store reads
        _, self.num_layers, self.num_kv_heads, self.width = tables.shape
        self.heads = self.num_layers * self.num_kv_heads  # blocks a slot of every (layer, KV head) takes
        self.host = np.full(tuple(tables.shape), -1, dtype=np.int32)  # the host copy of every row
        self.counts = np.zeros(tables.shape[:3], dtype=np.int64)  # (rows, L, H) blocks each head holds
        self.ref_counts = np.zeros(num_blocks, dtype=np.int64)  # rows holding each block (forks share)
        self.free: deque[int] = deque(range(num_blocks))
        self.free_rows: deque[int] = deque(range(rows))
        #: references beyond the first, over all blocks: 0 unless forks share blocks (then copy-on-write applies)
        self.extra_refs = 0
        #: (row, layer, head, column, block) table entries set on the host and not yet on the device
        self.pending: list[np.ndarray] = []
        #: :meth:`can_append`'s :meth:`_needs` answer, which :meth:`append_slot` takes while nothing it depends on changed
        self._last: tuple[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    # -- accounting ---------------------------------------------------------------------------------
    def blocks_for(self, slots: int) -> int:
        """Head-blocks for ``slots`` slots in every (layer, KV head)."""
        return self.heads * -(-slots // self.block_size)

    def held(self, seq: Sequence) -> int:
        """Head-blocks ``seq`` holds."""
        return int(self.counts[seq.ring_row].sum()) if seq.ring_row >= 0 else 0

    # -- allocation ---------------------------------------------------------------------------------
    def _take(self, count: int) -> np.ndarray:
        blocks = np.array([self.free.popleft() for _ in range(count)], dtype=np.int32)
        self.ref_counts[blocks] = 1
        return blocks

    def _unref(self, blocks: np.ndarray) -> None:
        """Drop one reference to each of ``blocks`` (distinct); those left with none are free again."""
        self.extra_refs -= int((self.ref_counts[blocks] > 1).sum())
        self.ref_counts[blocks] -= 1
        self.free.extend(blocks[self.ref_counts[blocks] == 0].tolist())

    def _sync(self, row: int) -> None:
        """Copy a row's host tables to the device (after a change of many heads), after the entries still pending:
        they may be older entries of the same row."""
        self.flush()
        self.tables[row].copy_(torch.from_numpy(self.host[row]), non_blocking=False)

    def flush(self) -> None:
        """Write the pending table entries to the device in one copy (from pinned memory: the host does not wait)."""
        if not self.pending:
            return
        entries = torch.from_numpy(np.concatenate(self.pending, 1).astype(np.int64))
        self.pending = []
        if self.tables.device.type == "cuda":
            entries = entries.pin_memory().to(self.tables.device, non_blocking=True)
        row, layer, head, column, block = entries
        self.tables[row, layer, head, column] = block.to(self.tables.dtype)

    def _virtual(self, seq: Sequence) -> None:
        """Its virtual table: one entry per block of its longest head."""
        longest = int(self.counts[seq.ring_row].max())
        if longest != len(seq.block_table):
            seq.block_table = [seq.ring_row * self.width + j for j in range(longest)]

    def can_allocate(self, slots: int, rows: int = 1) -> bool:
        """Whether ``slots`` slots in every head and ``rows`` table rows are free."""
        return self.blocks_for(slots) <= self.num_free and rows <= len(self.free_rows)

    def allocate(self, seq: Sequence, slots: int, shareable: int = 0, register: bool = True) -> None:
        """Give ``seq`` a table row and ``slots`` slots in every head (nothing is shared: ``shareable`` and
        ``register`` are the dense manager's, for prefix sharing, which this layout does not do)."""
        if seq.ring_row >= 0:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        row, count = self.free_rows.popleft(), -(-slots // self.block_size)
        self.host[row, :, :, :count] = self._take(self.heads * count).reshape(self.num_layers, self.num_kv_heads, count)
        self.counts[row] = count
        self._sync(row)
        seq.ring_row, seq.num_cached_tokens = row, 0
        self._virtual(seq)

    def register(self, seq: Sequence, tokens: int) -> None:
        """Nothing to register: no prefix is shared in this layout."""

    def forget(self, seq: Sequence, tokens: int) -> None:
        """Nothing to forget: no prefix is registered in this layout."""

    def reset_prefix_cache(self) -> None:
        """Nothing is cached for later prompts in this layout."""

    def _release(self, row: int, keep: np.ndarray) -> None:
        """Give back each head's blocks past its first ``keep[l, h]``."""
        past = np.arange(self.width) >= keep[..., None]
        blocks = self.host[row][past]
        self._unref(blocks[blocks >= 0])  # a block appears once in a row, so each loses one reference here
        self.host[row][past] = -1
        self.counts[row] = np.minimum(self.counts[row], keep)
        self._sync(row)

    def trim(self, seq: Sequence, slots: int) -> None:
        """Give back, per head, the blocks past the slots it holds (``seq.slot_lens``: ``slots`` is its longest)."""
        held = seq.slot_lens(self.num_layers, self.num_kv_heads).numpy()
        self._release(seq.ring_row, -(-held // self.block_size))
        self._virtual(seq)
        seq.peak_blocks = max(seq.peak_blocks, self.held(seq))  # counted from here on, as the dense manager does

    def free_seq(self, seq: Sequence) -> None:
        """Give back every head-block and the table row the sequence holds."""
        if seq.ring_row >= 0:
            self._release(seq.ring_row, np.zeros((self.num_layers, self.num_kv_heads), dtype=np.int64))
            self.free_rows.append(seq.ring_row)
            seq.ring_row = -1
        seq.block_table = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares all of ``parent``'s head-blocks, in a table row of its own (which holds no ring to copy:
        returns None)."""
        row, source = self.free_rows.popleft(), parent.ring_row
        self.host[row], self.counts[row] = self.host[source], self.counts[source]
        held = self.host[row][self.host[row] >= 0]
        self.ref_counts[held] += 1
        self.extra_refs += len(held)
        self._sync(row)
        child.ring_row, child.peak_blocks = row, parent.peak_blocks
        self._virtual(child)

    # -- decoding -----------------------------------------------------------------------------------
    def _needs(self, seq: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(L, H) heads whose blocks are all written (the next token needs a new block there), heads whose next slot
        lies in a block another sequence shares (it needs a copy), and each head's block column of that slot."""
        row = seq.ring_row
        held = seq.kv_slots if seq.pad is None else seq.kv_slots - seq.pad.numpy()  # seq.slot_lens, without torch
        held = np.broadcast_to(held, self.counts[row].shape)
        full = held >= self.counts[row] * self.block_size
        column = np.minimum(held // self.block_size, self.width - 1)
        shared = np.zeros_like(full)
        if self.extra_refs:  # only forks share blocks
            block = np.take_along_axis(self.host[row], column[..., None], -1)[..., 0]
            shared = ~full & (self.ref_counts[block] > 1)
        return full, shared, column

    def _state(self, seq: Sequence) -> tuple[int, ...]:
        """What :meth:`_needs` depends on besides the sequence's lengths: blocks taken or freed change ``free``,
        shared ones ``extra_refs``."""
        return seq.seq_id, seq.ring_row, seq.kv_slots, len(self.free), self.extra_refs

    def can_append(self, seq: Sequence) -> bool:
        """Whether every head that needs a block (new or copied) for the next token can get one."""
        needs = self._needs(seq)
        self._last = self._state(seq), needs  # the scheduler asks append_slot next, for the same answer
        full, shared, _ = needs
        return int(full.sum() + shared.sum()) <= self.num_free

    def append_slot(self, seq: Sequence) -> list[tuple[int, int]]:
        """Give a new block to each head whose blocks are full and a copy of its block to each head whose next slot
        is shared; returns the (source, destination) block copies to perform."""
        last, self._last = self._last, None
        full, shared, column = last[1] if last is not None and last[0] == self._state(seq) else self._needs(seq)
        need = full | shared
        if not need.any():
            return []
        row = seq.ring_row
        layer, head = need.nonzero()
        at = column[layer, head]
        old = self.host[row, layer, head, at]
        blocks = self._take(len(layer))
        copied = shared[layer, head]
        self._unref(old[copied])  # shared: another row still holds each
        self.host[row, layer, head, at] = blocks
        self.counts[row, layer, head] += full[layer, head]
        self.pending.append(np.stack([np.full_like(layer, row), layer, head, at, blocks]))
        self._virtual(seq)
        seq.peak_blocks = max(seq.peak_blocks, self.held(seq))
        return list(zip(old[copied].tolist(), blocks[copied].tolist()))
