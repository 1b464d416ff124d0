"""Head-granular pages: a block holds ``block_size`` tokens of ONE (layer, KV head), so heads that keep fewer tokens
take fewer blocks.

Why: with per-head or per-layer budgets (AdaKV, auto, PyramidKV, KVzip's request-wide budget) every (layer, KV head)
keeps its own number of tokens. :class:`~kvslim.engine.kv_store.DenseKV`'s block holds a slot for every layer and
head, so a sequence takes blocks for its *longest* head and the shorter ones leave theirs empty: AdaKV at 25% held
0.46 of the full cache there, against 0.26 under ``kvslim.Cache``. Here each (layer, KV head) has its own block table
and holds ``ceil(kept / block_size)`` blocks; only its last block may be partly empty.

Where the tables live: each running sequence holds a *row* (the block manager hands rows out as it does residual
ring rows) of ``tables`` ``(rows, L, H, width)`` on the device, ``width`` the most blocks one head can need
(``max_model_len / block_size``, or less in a pool that could not hold more for every head). The rows' bytes come
out of ``kv_memory`` like a ring's. The rest of the engine keeps addressing a sequence by one *virtual* table:
``seq.block_table[j] = row * width + j`` (see :class:`~kvslim.engine.head_blocks.HeadBlockManager`), and a virtual
slot ``(row * width + j) * block_size + offset`` means offset ``offset`` of block ``j`` of each head's own table.
The store resolves it per (layer, head), so the runner's prefill, suffix and decode paths write and read through the
same calls as over dense pages.

The paged decode kernels need no change: each (sequence, KV head) is one row of a batch over pages with one KV
head, with its own table, its own length, and its query group (see :func:`head_decode`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..kernels.paged_attention_ref import paged_decode_ref
from .kv_store import MAX_RING_SHARE, _backend, padded_writes, ring_rows
from .sequence import Sequence


def head_decode(attend: Callable[..., Tensor], query: Tensor, k_pages: Tensor, v_pages: Tensor, tables: Tensor,
                lens: Tensor, starts: Tensor, sinks: Tensor, scale: float) -> Tensor:
    """Paged decode attention with a block table per KV head: query (B, Hq, D); k_pages, v_pages (N, bs, 1, D);
    tables (B, H, M) (-1: no block); lens (B, H) tokens each head holds; starts, sinks (B,) -> (B, Hq, D).

    ``attend`` is :func:`~kvslim.kernels.paged_attention_ref.paged_decode_ref` or the Triton ``paged_decode``: each
    (sequence, KV head) becomes a sequence of one KV head whose query group is the head's query heads (GQA keeps
    query heads ``h * group ... (h + 1) * group - 1`` on KV head ``h``)."""
    batch, q_heads, dim = query.shape
    heads = tables.shape[1]
    out = attend(query.reshape(batch * heads, q_heads // heads, dim), k_pages, v_pages, tables.flatten(0, 1),
                 lens.reshape(batch * heads, 1), starts.repeat_interleave(heads), sinks.repeat_interleave(heads), scale)
    return out.reshape(batch, q_heads, -1)


@dataclass
class HeadStep:
    """What one decode step of :class:`HeadKV` reads."""

    slots: Tensor  # (B, L, H) physical slot each head's new token is written to
    rows: Tensor  # (B,) each sequence's row of the tables
    width: int  # table columns any head of the batch reads (the widest virtual table; a CUDA graph's: all of them)


class HeadKV:
    """Model-dtype pages of one (layer, KV head) per block, with per-head block tables (see the module docstring)."""

    quantized = False
    ring = False
    ring_share = MAX_RING_SHARE  # the most of ``kv_memory`` the table rows may take
    graphable = True  # a graph replays the step with ``width`` = :attr:`width` (see ``DecodeGraphs``)

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 block_size: int, max_model_len: int, budget: int):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.block_size = dtype, device, block_size
        #: blocks one head may hold: a request is refused unless every head's whole prompt and output fit in the pool
        #: at once (``Scheduler.check``), so no head outgrows a share of ``budget`` or ``max_model_len``
        self.width = max(1, min(-(-max_model_len // block_size),
                                budget // self.block_bytes(block_size) // (num_layers * num_kv_heads)))
        self.row_bytes = num_layers * num_kv_heads * self.width * 4  # a sequence's int32 tables
        self.k_cache = self.v_cache = self.tables = torch.empty(0)
        self._attend = _backend(device, "paged_attention", "paged_decode", paged_decode_ref)

    def block_bytes(self, block_size: int) -> int:
        """Keys and values of ``block_size`` tokens of one (layer, KV head)."""
        return 2 * block_size * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def host_block_bytes(self, block_size: int) -> int:
        return 0

    def rows_for(self, budget: int, max_num_seqs: int) -> int:
        what = f"a sequence's per-head block tables ({self.num_layers} layers x {self.num_kv_heads} KV heads)"
        return ring_rows(budget, max_num_seqs, self.row_bytes, self.ring_share, what)

    def allocate(self, num_blocks: int, block_size: int, rows: int) -> None:
        if block_size != self.block_size:
            raise ValueError(f"head pages were planned for blocks of {self.block_size} tokens, not {block_size}")
        shape = (num_blocks, block_size, 1, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.tables = torch.full((rows, self.num_layers, self.num_kv_heads, self.width), -1, dtype=torch.int32,
                                 device=self.device)

    def pad_row(self, row: int, block: int) -> None:
        """Point every head of table row ``row`` at block ``block``: a CUDA graph's padding rows attend there (to the
        one token they write into it) and never touch a real sequence's blocks."""
        self.tables[row, :, :, 0] = block

    def copy_blocks(self, src: Tensor, dst: Tensor) -> None:
        """Copy-on-write of head-blocks a fork shared."""
        self.k_cache[dst] = self.k_cache[src]
        self.v_cache[dst] = self.v_cache[src]

    def physical(self, layer: int, slots: Tensor) -> Tensor:
        """(H, T) physical slots of virtual ``slots`` (T,) or (H, T) in layer ``layer``: each head's own block; -1
        where a slot is -1 or lies past the head's blocks."""
        virtual = slots.clamp(min=0) // self.block_size
        heads = torch.arange(self.num_kv_heads, device=slots.device)[:, None]
        block = self.tables[virtual // self.width, layer, heads, virtual % self.width].long()
        return torch.where((slots >= 0) & (block >= 0), block * self.block_size + slots % self.block_size, -1)

    def _flat(self, pages: Tensor) -> Tensor:
        return pages.view(-1, self.head_dim)

    def read(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """(T, H, D) keys and values at virtual slots (T,); slots a head does not hold read whatever is there."""
        where = self.physical(layer, slots).clamp(min=0)
        return self._flat(self.k_cache)[where].transpose(0, 1), self._flat(self.v_cache)[where].transpose(0, 1)

    def store_prefill(self, layer: int, seq: Sequence, slots: Tensor, keys: Tensor, values: Tensor, lens: Tensor
                      ) -> tuple[Tensor, None]:
        """Store (H, T, D) keys/values from virtual ``slots`` (T,), only the first ``lens[h]`` of each head, without a
        host wait (:func:`~kvslim.engine.kv_store.padded_writes`)."""
        lens = lens.to(self.device)
        if keys.shape[1]:
            where = self.physical(layer, slots)  # (H, T) each head's own slots
            for pages, rows in ((self.k_cache, keys), (self.v_cache, values)):
                flat = self._flat(pages)
                columns, written = padded_writes(rows, lens, flat[where[:, 0].clamp(min=0)])
                flat[where.gather(1, columns).clamp(min=0)] = written
        return lens, None

    def write(self, layer: int, slots: Tensor, keys: Tensor, values: Tensor) -> None:
        """Store (H, T, D) keys/values at per-head virtual ``slots`` (H, T) (a suffix after a ragged prefill)."""
        where = self.physical(layer, slots)
        self._flat(self.k_cache)[where] = keys
        self._flat(self.v_cache)[where] = values

    # -- decoding -----------------------------------------------------------------------------------
    def grows(self, seq: Sequence) -> bool:
        """Every decode step writes one slot per head (the block manager adds blocks to the heads that are full)."""
        return True

    def prepare(self, seqs: list[Sequence], tables: Tensor, held: Tensor) -> HeadStep:
        """The step's physical write slots (B, L, H), from each head's own table on the device."""
        put = lambda x: x.to(self.device, non_blocking=True)  # noqa: E731
        rows, blocks = put(torch.tensor([s.ring_row for s in seqs])), put(held // self.block_size)
        layers = torch.arange(self.num_layers, device=self.device)[None, :, None]
        heads = torch.arange(self.num_kv_heads, device=self.device)[None, None, :]
        block = self.tables[rows[:, None, None], layers, heads, blocks].long()
        return HeadStep(block * self.block_size + put(held % self.block_size), rows, tables.shape[1])

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, batch: Any, scale: float) -> Tensor:
        """Write the step's keys/values (B, H, D) to each head's slot, then attend over each head's own blocks."""
        step: HeadStep = batch.kv
        slots = step.slots[:, layer]
        self._flat(self.k_cache)[slots] = k
        self._flat(self.v_cache)[slots] = v
        tables = self.tables[step.rows, layer, :, : step.width]
        return head_decode(self._attend, q, self.k_cache, self.v_cache, tables, batch.lens[:, layer] + 1,
                           batch.starts, batch.sinks, scale)

    def finish(self, batch: Any) -> None:
        """Nothing to move after a step: every token went to its page."""

    def advance(self, seq: Sequence) -> None:
        seq.kv_slots += 1
