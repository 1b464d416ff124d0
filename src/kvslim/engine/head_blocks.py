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
full. Prefix sharing, forks and KV tiers are not supported here: the engine routes those to the dense layout or
refuses them.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import Tensor

from .sequence import Sequence


class HeadBlockManager:
    """Hands out head-blocks and table rows to sequences and takes them back."""

    def __init__(self, num_blocks: int, block_size: int, rows: int, tables: Tensor):
        self.num_blocks, self.block_size, self.rows = num_blocks, block_size, rows
        self.tables = tables  # (rows, L, H, width) int32 on the device: what the store reads
        _, self.num_layers, self.num_kv_heads, self.width = tables.shape
        self.heads = self.num_layers * self.num_kv_heads  # blocks a slot of every (layer, KV head) takes
        self.host = np.full(tuple(tables.shape), -1, dtype=np.int32)  # the host copy of every row
        self.counts = np.zeros(tables.shape[:3], dtype=np.int64)  # (rows, L, H) blocks each head holds
        self.free: deque[int] = deque(range(num_blocks))
        self.free_rows: deque[int] = deque(range(rows))

    # -- accounting ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, slots: int) -> int:
        """Head-blocks for ``slots`` slots in every (layer, KV head)."""
        return self.heads * -(-slots // self.block_size)

    def held(self, seq: Sequence) -> int:
        """Head-blocks ``seq`` holds."""
        return int(self.counts[seq.ring_row].sum()) if seq.ring_row >= 0 else 0

    # -- allocation ---------------------------------------------------------------------------------
    def _take(self, count: int) -> np.ndarray:
        return np.array([self.free.popleft() for _ in range(count)], dtype=np.int32)

    def _sync(self, row: int) -> None:
        """Copy a row's host tables to the device (after a change of many heads)."""
        self.tables[row].copy_(torch.from_numpy(self.host[row]), non_blocking=False)

    def _virtual(self, seq: Sequence) -> None:
        """Its virtual table: one entry per block of its longest head."""
        seq.block_table = [seq.ring_row * self.width + j for j in range(int(self.counts[seq.ring_row].max()))]

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
        self.free.extend(blocks[blocks >= 0].tolist())
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

    # -- decoding -----------------------------------------------------------------------------------
    def _full(self, seq: Sequence) -> np.ndarray:
        """(L, H) heads whose blocks are all written: the next token needs a new block there."""
        held = seq.slot_lens(self.num_layers, self.num_kv_heads).numpy()
        return held >= self.counts[seq.ring_row] * self.block_size

    def can_append(self, seq: Sequence) -> bool:
        """Whether every head that needs a block for the next token can get one."""
        return int(self._full(seq).sum()) <= self.num_free

    def append_slot(self, seq: Sequence) -> list[tuple[int, int]]:
        """Give a new block to each head whose blocks are full; nothing is shared, so no copies (returns [])."""
        full = self._full(seq)
        if full.any():
            row = seq.ring_row
            layer, head = full.nonzero()
            column = self.counts[row, layer, head]
            blocks = self._take(len(layer))
            self.host[row, layer, head, column] = blocks
            self.counts[row, layer, head] += 1
            at = [torch.from_numpy(x).to(self.tables.device) for x in (layer, head, column, blocks)]
            self.tables[row, at[0], at[1], at[2]] = at[3]
            self._virtual(seq)
            seq.peak_blocks = max(seq.peak_blocks, self.held(seq))
        return []
