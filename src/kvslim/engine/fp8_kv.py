"""vLLM's fp8 KV cache in the engine: ``fp8_e4m3`` / ``fp8_e5m2`` pages whose scales are fixed at prefill.

A :class:`~kvslim.engine.kv_store.QuantKV` with one difference: a token's scale is not its own but its
sequence's (per layer, keys and values apart, and per KV head with ``scale=per-head``), measured over the
tokens the sequence stores at its prefill, as :class:`kvslim.methods.fp8_static.StaticFP8` does under
``kvslim.Cache`` (same function, same numbers). The sequence's scales travel with its ring row
(``scales``: ``(layers, rows, 2, 1 or H)`` float32, charged in ``row_bytes``): every token it packs while
decoding is coded, and clamped, under them. Each page block also keeps the scale of the sequence that wrote
it (:mod:`kvslim.kernels.paged_quant`), which the decode kernel reads per block.

A sequence that finds its prompt's first blocks in the prefix cache (or a KV tier) measures its scales over
those tokens as its blocks give them back and the tokens it computes (the cached blocks keep the scales they
were written with); a preempted sequence that is recomputed measures them again over its prompt and the
tokens it had generated.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..cache.fp8 import SCALE_BYTES, static_scales, to_fp8
from ..kernels.paged_quant import Codes
from ..methods.fp8_static import StaticFP8
from .kv_store import QuantKV
from .sequence import Sequence


class StaticFP8KV(QuantKV):
    """fp8 pages under per-sequence static scales (see the module docstring)."""

    quantizer: StaticFP8

    def __init__(self, quantizer: StaticFP8, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(quantizer, num_layers, num_kv_heads, head_dim, dtype, device)
        self.scale_heads = num_kv_heads if quantizer.per_head else 1
        self.row_bytes += 2 * num_layers * self.scale_heads * SCALE_BYTES
        self.scales = torch.empty(0)

    def _setup_codes(self) -> None:
        self.key_codes = self.value_codes = Codes.static_fp8(self.quantizer.fmt, self.quantizer.per_head, self.head_dim)

    def allocate(self, num_blocks: int, block_size: int, rows: int) -> None:
        super().allocate(num_blocks, block_size, rows)
        self.scales = torch.ones((self.num_layers, rows, 2, self.scale_heads), dtype=torch.float32, device=self.device)

    def copy_row(self, src: int, dst: int) -> None:
        super().copy_row(src, dst)
        self.scales[:, dst] = self.scales[:, src]

    def store_prefill(self, layer: int, seq: Sequence, slots: Tensor, keys: Tensor, values: Tensor, lens: Tensor
                      ) -> tuple[Tensor, Tensor]:
        """Measure the sequence's scales over its prompt (the (H, T, D) keys/values it stores, after any cached
        prefix read back from its blocks), then pack under them."""
        measured = [keys, values]
        valid = torch.arange(keys.shape[1], device=self.device) < lens[:, None]
        if seq.num_cached_tokens:
            prefix = self.read(layer, self._prefix_slots(seq))
            measured = [torch.cat([p.transpose(0, 1), x], 1) for p, x in zip(prefix, measured)]
            valid = torch.cat([valid.new_ones(keys.shape[0], seq.num_cached_tokens), valid], 1)
        for tensor, x in enumerate(measured):
            self.scales[layer, seq.ring_row, tensor] = static_scales(x[None], valid[None], self.quantizer.per_head,
                                                                     self.quantizer.fmt)[0]
        return super().store_prefill(layer, seq, slots, keys, values, lens)

    def _prefix_slots(self, seq: Sequence) -> Tensor:
        """Flat slots of the prompt tokens the prefix cache (or a KV tier) gave ``seq``."""
        cached = seq.num_cached_tokens
        blocks = torch.tensor(seq.block_table[: -(-cached // self.block_size)], device=self.device)
        offsets = torch.arange(self.block_size, device=self.device)
        return (blocks[:, None] * self.block_size + offsets).flatten()[:cached]

    def _write(self, layers: Tensor | int, rows: Tensor | int, slots: Tensor, heads: Tensor, keys: Tensor,
               values: Tensor) -> None:
        """Code rows (N, D) under their sequences' scales; each block records the scale it was written with."""
        scale_heads = heads if self.quantizer.per_head else torch.zeros_like(heads)
        pages = self.pages.keys, self.pages.values  # type: ignore[union-attr]
        for tensor, (page, x) in enumerate(zip(pages, (keys, values))):
            row_scale = self.scales[layers, rows, tensor, scale_heads]
            page.write_static(layers, slots, heads, to_fp8(x, row_scale, self.quantizer.fmt), row_scale)
