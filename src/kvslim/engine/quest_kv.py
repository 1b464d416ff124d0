"""Quest in the engine: model-dtype pages plus each block's key minimum and maximum; a step reads only the
selected blocks of each KV head.

The method object is the Hugging Face path's (:class:`kvslim.methods.quest.Quest`), and so is its rule: a page
is a block (``block_size`` = ``page``), bounded by :func:`kvslim.kernels.quest_ref.page_bounds` and chosen by
:func:`kvslim.kernels.quest_ref.force_pages` and :func:`kvslim.kernels.quest_ref.pick_pages`, so both paths
read the same pages.

Layout. ``kmin``/``kmax`` (L, blocks, H, D) in the model dtype beside the pages. The prefill writes each
touched block's extrema from the tokens it stores; every decode write folds its key into its block's
extrema (:func:`kvslim.kernels.quest.fold_block_extrema`; a write at a block's first slot starts them afresh,
so a reused block never carries stale ones).
A step then scores every block of each (sequence, KV head) (Triton: :func:`kvslim.kernels.quest.quest_block_scores`),
picks ``budget // page`` of them and runs the paged decode over those alone
(:func:`kvslim.kernels.quest.paged_sparse_decode`). Every shape is fixed by the block table's width and the
budget, so the step is captured in CUDA graphs like a full one. Memory: every token stays, plus
2 / ``block_size`` of the keys' bytes for the extrema (:meth:`QuestKV.block_bytes`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..kernels.quest_ref import fold_block_extrema_ref, paged_sparse_decode_ref, pick_pages, quest_block_scores_ref
from ..methods.quest import Quest
from .kv_store import DenseKV, _backend, heads_expand
from .sequence import Sequence


class QuestKV(DenseKV):
    """Model-dtype pages (as :class:`DenseKV`) plus per-block key extrema; sparse decode (see the module docstring)."""

    def __init__(self, method: Quest, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(num_layers, num_kv_heads, head_dim, dtype, device)
        self.method = method
        self.kmin = self.kmax = torch.empty(0)
        self._score = _backend(device, "quest", "quest_block_scores", quest_block_scores_ref)
        self._sparse = _backend(device, "quest", "paged_sparse_decode", paged_sparse_decode_ref)
        self._fold = _backend(device, "quest", "fold_block_extrema", fold_block_extrema_ref)

    def default_block_size(self) -> int:
        return self.method.page

    def block_bytes(self, block_size: int) -> int:
        """A dense block plus its key minimum and maximum in every layer."""
        if block_size != self.method.page:
            raise ValueError(f"{self.method.spec} bounds pages of {self.method.page} tokens, which are the engine's "
                             f"blocks: use block_size={self.method.page} (or leave it out), not {block_size}")
        element = torch.empty((), dtype=self.dtype).element_size()
        return super().block_bytes(block_size) + 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    def allocate(self, num_blocks: int, block_size: int, rows: int) -> None:
        super().allocate(num_blocks, block_size, rows)
        shape = (self.num_layers, num_blocks, self.num_kv_heads, self.head_dim)
        self.kmin = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kmax = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def copy_blocks(self, src: Tensor, dst: Tensor) -> None:
        super().copy_blocks(src, dst)
        self.kmin[:, dst] = self.kmin[:, src]
        self.kmax[:, dst] = self.kmax[:, src]

    def layout(self) -> str:
        return f"{self.method.spec}:{super().layout()}"

    def block_tensors(self, block: int) -> list[Tensor]:
        return [*super().block_tensors(block), self.kmin[:, block], self.kmax[:, block]]

    def store_prefill(self, layer: int, seq: Sequence, slots: Tensor, keys: Tensor, values: Tensor, lens: Tensor
                      ) -> tuple[Tensor, Tensor | None]:
        """Store as :class:`DenseKV` does, then set the extrema of every block the prefill wrote from its tokens."""
        held, ring = super().store_prefill(layer, seq, slots, keys, values, lens)
        heads, length, dim = keys.shape
        valid = torch.arange(length, device=keys.device) < lens[:, None]
        grid, head = heads_expand(slots, heads)
        rows = ((grid // self.block_size) * heads + head)[valid]  # (block, head) rows of the flat extrema
        index = rows[:, None].expand(-1, dim)
        for extrema, reduce in ((self.kmin[layer], "amin"), (self.kmax[layer], "amax")):
            extrema.view(-1, dim).scatter_reduce_(0, index, keys[valid], reduce, include_self=False)
        return held, ring

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, batch: Any, scale: float) -> Tensor:
        """Write the step's keys/values (B, H, D) and fold the keys into their blocks' extrema; score every block,
        attend (B, Hq, D) over the selected ones."""
        slots = batch.kv[:, layer]
        heads = torch.arange(self.num_kv_heads, device=self.device).expand(len(q), -1)
        flat = (-1, self.num_kv_heads, self.head_dim)
        self.k_cache[layer].view(flat)[slots, heads] = k
        self.v_cache[layer].view(flat)[slots, heads] = v
        self._fold(self.kmin[layer], self.kmax[layer], slots, k, self.block_size)
        lens = batch.lens[:, layer] + 1
        scores = self._score(q, self.kmin[layer], self.kmax[layer], batch.block_tables, lens, self.block_size,
                             self.method.sink_pages)
        selected = pick_pages(scores, self.method.top)
        return self._sparse(q, self.k_cache[layer], self.v_cache[layer], batch.block_tables, selected, lens, scale)
