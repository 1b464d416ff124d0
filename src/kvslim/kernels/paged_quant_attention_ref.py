"""Paged decode attention over quantized pages plus a full-precision residual, in plain PyTorch.

The reference the Triton kernel is tested against, and the engine's path on CPU. A sequence's tokens
are in two places:

* its blocks of :class:`~kvslim.kernels.paged_quant.QuantPages` (slots ``[0, lens)`` per KV head, minus a
  sliding window's hidden ``[sinks, start)``, as in :func:`~kvslim.kernels.paged_attention_ref.paged_decode_ref`);
* its row of the residual ``ring`` ``(rows, capacity, H, D)`` in the model dtype: the newest tokens, not yet
  packed (KIVI keeps 128+ of them; per-token formats only the token being decoded), ``ring_lens`` per head.

Attention is a softmax over the union, so where each token sits does not matter. Pages are dequantized
to float32, rounded to the model dtype (what ``kvslim.Cache`` attends over), then attended in float32.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .paged_attention_ref import slot_mask
from .paged_quant import QuantPages


def paged_quant_decode_ref(query: Tensor, pages: QuantPages, block_tables: Tensor, lens: Tensor, starts: Tensor,
                           sinks: Tensor, ring_k: Tensor, ring_v: Tensor, rows: Tensor, ring_lens: Tensor,
                           scale: float) -> Tensor:
    """query (B, Hq, D); ``pages`` one layer's; block_tables (B, M) (-1: no block); lens (B, H); starts, sinks (B,);
    ring_k/ring_v (S, C, H, D); rows (B,) each sequence's ring row; ring_lens (B, H). Returns (B, Hq, D)."""
    batch, q_heads, dim = query.shape
    tables = block_tables.clamp(min=0).long()
    kv_heads = pages.keys.codes.shape[-2]

    def gather(codes: Tensor) -> Tensor:  # (B, M, bs, H, D) -> (B, H, T, D) in the model dtype, then float32
        return codes.flatten(1, 2).transpose(1, 2).to(query.dtype).float()

    keys = torch.cat([gather(pages.keys.dequantize(tables)), ring_k[rows].transpose(1, 2).float()], 2)
    values = torch.cat([gather(pages.values.dequantize(tables)), ring_v[rows].transpose(1, 2).float()], 2)
    paged = slot_mask(lens, starts, sinks, tables.shape[1] * pages.keys.codes.shape[1])
    ring = torch.arange(ring_k.shape[1], device=query.device) < ring_lens.unsqueeze(-1)
    mask = torch.cat([paged, ring], -1)
    group = q_heads // kv_heads
    q = query.float().view(batch, kv_heads, group, dim)
    scores = torch.einsum("bhgd,bhtd->bhgt", q, keys) * scale
    probs = scores.masked_fill(~mask[:, :, None, :], float("-inf")).softmax(-1)
    out = torch.einsum("bhgt,bhtd->bhgd", probs, values)
    return out.reshape(batch, q_heads, -1).to(query.dtype)
