"""Paged decode attention in plain PyTorch: gather a sequence's blocks, mask, attend.

The reference the Triton kernel is tested against, and the path the engine takes on CPU. The
pool is one layer's pages ``(num_blocks, block_size, kv_heads, head_dim)``; a sequence's slots are
its block table read in order. Which slots hold a real token is decided per (sequence, KV head):

* slots ``[0, lens)`` are written (heads may differ: ragged methods pad within the sequence's blocks);
* a sliding window (StreamingLLM) additionally hides slots in ``[sinks, start)``: those tokens were
  evicted, and the blocks that lay wholly inside that range were handed back (table entry -1).

Keys may be narrower than values (ThinK's key pages hold only the kept channels, and the query comes gathered to
them, :mod:`kvslim.engine.think_kv`); ``newest`` then adds to each head's newest slot the score its key's pruned
channels would give, so the token being decoded attends with its whole key, as under ``kvslim.Cache``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def slot_mask(lens: Tensor, starts: Tensor, sinks: Tensor, num_slots: int) -> Tensor:
    """(B, H, T) True where a slot holds a token attention must see."""
    slot = torch.arange(num_slots, device=lens.device)
    held = slot < lens.unsqueeze(-1)
    window = (slot < sinks[:, None, None]) | (slot >= starts[:, None, None])
    return held & window


def paged_decode_ref(query: Tensor, k_pages: Tensor, v_pages: Tensor, block_tables: Tensor, lens: Tensor,
                     starts: Tensor, sinks: Tensor, scale: float, newest: Tensor | None = None) -> Tensor:
    """Attention of one new query per sequence over its paged keys and values.

    query (B, Hq, Dk); k_pages (N, bs, H, Dk); v_pages (N, bs, H, Dv); block_tables (B, M) int (-1: no block);
    lens (B, H) slots written per KV head; starts, sinks (B,) the sliding window (0, 0 when none);
    ``newest`` (B, Hq) float32, added to the scaled score of each head's slot ``lens - 1`` (None: nothing).
    Returns (B, Hq, Dv) in the query's dtype; softmax in float32.
    """
    batch, q_heads, dim = query.shape
    kv_heads = k_pages.shape[2]
    tables = block_tables.clamp(min=0).long()
    keys = k_pages[tables].reshape(batch, -1, kv_heads, dim).transpose(1, 2).float()  # (B, H, T, D)
    values = v_pages[tables].reshape(batch, -1, kv_heads, v_pages.shape[-1]).transpose(1, 2).float()
    mask = slot_mask(lens, starts, sinks, keys.shape[2])
    group = q_heads // kv_heads
    q = query.float().view(batch, kv_heads, group, dim)
    scores = torch.einsum("bhgd,bhtd->bhgt", q, keys) * scale
    if newest is not None:
        last = torch.arange(keys.shape[2], device=lens.device) == (lens - 1)[..., None]  # (B, H, T)
        scores = scores + last[:, :, None, :] * newest.float().view(batch, kv_heads, group, 1)
    scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    probs = scores.softmax(-1)
    out = torch.einsum("bhgt,bhtd->bhgd", probs, values)
    return out.reshape(batch, q_heads, -1).to(query.dtype)
