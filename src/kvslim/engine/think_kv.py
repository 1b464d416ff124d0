"""ThinK in the engine: key pages hold only the channels each KV head keeps, value pages stay whole.

The method object is the Hugging Face path's (:class:`kvslim.methods.think.ThinK`), and so is its rule: after the
prefill (and any evictor before it) :class:`kvslim.engine.compression.Compression` chooses each (layer, KV head)'s
``D' = ThinK.kept_channels(D)`` channels with ``ThinK.channels``, from the kept keys and the newest prompt queries,
and hands the pages the keys gathered to them.

Layout. ``k_cache`` (L, blocks, block_size, H, D') beside ``v_cache`` (L, blocks, block_size, H, D), so a block
costs ``(D' + D) / 2D`` of a model-dtype one and the same ``kv_memory`` holds that many more tokens. Each sequence
keeps its channel indices (L, H, D') as int16 in its *row* of ``channels`` (the row machinery of the quantized
stores, :func:`kvslim.engine.kv_store.ring_rows`): these are the bytes ``kvslim.Cache`` counts for them, taken out of
``kv_memory`` before the blocks are counted.

A decode step gathers each query head to its KV head's channels (B, Hq, D') and the new key to the same channels
before it is written, then runs the paged decode over narrow keys and whole values. As under ``kvslim.Cache``,
the token being decoded attends with its whole key once: ``newest`` adds its pruned channels' score to its own
slot. Every shape is fixed and the rows are a step input, so the step is captured in CUDA graphs like a dense one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..methods.think import ThinK
from .kv_store import DenseKV, ring_rows
from .sequence import Sequence


@dataclass
class ThinStep:
    """What one decode step of :class:`ThinKV` reads: the new tokens' slots and each sequence's channel row."""

    slots: Tensor  # (B, L, H) flat slot of each head's new token
    rows: Tensor  # (B,) row of ``ThinKV.channels``


class ThinKV(DenseKV):
    """Key pages of the kept channels, whole value pages, per-sequence channel rows (see the module docstring)."""

    def __init__(self, method: ThinK, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(num_layers, num_kv_heads, head_dim, dtype, device)
        self.method = method
        self.kept = method.kept_channels(head_dim)
        self.row_bytes = num_layers * num_kv_heads * self.kept * torch.empty((), dtype=torch.int16).element_size()
        self.channels = torch.empty(0)

    def block_bytes(self, block_size: int) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * block_size * self.num_kv_heads * (self.kept + self.head_dim) * element

    def rows_for(self, budget: int, max_num_seqs: int) -> int:
        what = f"{self.method.spec} keeps each sequence's kept key channels on the device"
        return ring_rows(budget, max_num_seqs, self.row_bytes, self.ring_share, what)

    def allocate(self, num_blocks: int, block_size: int, rows: int) -> None:
        pages = (self.num_layers, num_blocks, block_size, self.num_kv_heads)
        self.k_cache = torch.zeros(*pages, self.kept, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(*pages, self.head_dim, dtype=self.dtype, device=self.device)
        self.channels = torch.zeros(self.num_layers, rows, self.num_kv_heads, self.kept, dtype=torch.int16,
                                    device=self.device)
        self.block_size = block_size

    def copy_row(self, src: int, dst: int) -> None:
        """A fork continues with its parent's channels."""
        self.channels[:, dst] = self.channels[:, src]

    def set_channels(self, seq: Sequence, channels: list[Tensor]) -> None:
        """Record a prefilled sequence's channels, (H, D') per layer, in its row."""
        self.channels[:, seq.ring_row] = torch.stack(channels).to(self.device, torch.int16)

    def layout(self) -> str:
        return f"{self.method.spec}:{super().layout()}"

    def prepare(self, seqs: list[Sequence], tables: Tensor, held: Tensor) -> ThinStep:
        rows = torch.tensor([s.ring_row for s in seqs]).to(self.device, non_blocking=True)
        return ThinStep(super().prepare(seqs, tables, held), rows)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, batch: Any, scale: float) -> Tensor:
        """Gather the step's queries (B, Hq, D) and keys (B, H, D) to each head's channels, write the thin keys and
        the values, attend; the new token's own score counts its whole key."""
        step: ThinStep = batch.kv
        seqs, q_heads = q.shape[:2]
        channels = self.channels[layer][step.rows].long()  # (B, H, D')
        grouped = q.view(seqs, self.num_kv_heads, -1, self.head_dim)  # (B, H, G, D)
        thin_q = grouped.gather(-1, channels[:, :, None].expand(*grouped.shape[:3], self.kept))
        thin_k = k.gather(-1, channels)
        whole = (grouped.float() * k[:, :, None].float()).sum(-1)
        newest = (whole - (thin_q.float() * thin_k[:, :, None].float()).sum(-1)) * scale  # the pruned channels' score
        heads = torch.arange(self.num_kv_heads, device=self.device).expand(seqs, -1)
        self.k_cache[layer].flatten(0, 1)[step.slots[:, layer], heads] = thin_k
        self.v_cache[layer].flatten(0, 1)[step.slots[:, layer], heads] = v
        return self._attend(thin_q.reshape(seqs, q_heads, self.kept), self.k_cache[layer], self.v_cache[layer],
                            batch.block_tables, batch.lens[:, layer] + 1, batch.starts, batch.sinks, scale,
                            newest=newest.view(seqs, q_heads))
