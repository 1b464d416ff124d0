"""Triton paged decode attention: one new query per sequence over its blocks, online softmax.

Same contract as :func:`kvslim.kernels.paged_attention_ref.paged_decode_ref` (the tested reference).
One program per (sequence, KV head, split) serves the whole query group of that head (GQA), so each
key and value page is read once per group; a sequence's blocks are split over several programs when
there are few sequences (flash-decoding, see :mod:`kvslim.kernels.paged_split`). Blocks a sliding
window has passed are never touched: the walk covers the sink blocks, then the window's first block
to the last written one, and each split takes a contiguous chunk of that walk. Given a ``selected`` table
(B, H, k) of block positions instead (Quest, :mod:`kvslim.kernels.quest`), each (sequence, KV head) walks
only its own selected blocks: the same kernel, reading k blocks per head.
Key pages may be narrower than value pages (ThinK keeps some key channels, the query comes gathered to them), any
width (padded to a power of two, masked); ``newest`` then adds each head's pruned-channel score to its newest slot.
Pages are typically bf16; they are widened to float32 on load, so scores, softmax and both products
are float32 (decode reads each page once: it is bound by memory, not by the multiplies).
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .paged_split import combine, partials, plan_splits, store_partial


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr, tables_ptr, lens_ptr, starts_ptr, sinks_ptr, sel_ptr, newest_ptr,
    scale, splits, top, stride_qb, stride_qh, stride_tb,
    stride_kn, stride_ks, stride_kh, stride_vn, stride_vs, stride_vh, stride_lb, stride_sb, stride_sh, stride_nb,
    H: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, KEY_DIM: tl.constexpr,
    BLOCK_KD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGES: tl.constexpr, SELECT: tl.constexpr, NEWEST: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    dk = tl.arange(0, BLOCK_KD)  # key channels (KEY_DIM of them, padded to a power of two)
    d = tl.arange(0, HEAD_DIM)  # value channels
    q_rows = h * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + q_rows[:, None] * stride_qh + dk[None, :],
                mask=(g < GROUP)[:, None] & (dk < KEY_DIM)[None, :], other=0.0)
    q = q.to(tl.float32) * scale
    length = tl.load(lens_ptr + b * stride_lb + h)
    if NEWEST:  # (BLOCK_G,) added to the score of slot length - 1
        newest = tl.load(newest_ptr + b * stride_nb + q_rows, mask=g < GROUP, other=0.0).to(tl.float32)
    start = tl.load(starts_ptr + b)
    sinks = tl.load(sinks_ptr + b)
    m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    t = tl.arange(0, PAGES * BLOCK_SIZE)  # the tile's tokens: PAGES pages of BLOCK_SIZE slots
    page, s = t // BLOCK_SIZE, t % BLOCK_SIZE
    sink_blocks = tl.minimum(tl.cdiv(sinks, BLOCK_SIZE), tl.cdiv(length, BLOCK_SIZE))
    first_window = tl.maximum(start // BLOCK_SIZE, sink_blocks)
    steps = sink_blocks + tl.cdiv(length, BLOCK_SIZE) - first_window
    if SELECT:
        steps = top
    chunk = tl.cdiv(steps, splits)  # this sequence's blocks spread evenly over the splits
    end = tl.minimum(steps, (split + 1) * chunk)
    for i0 in range(split * chunk, end, PAGES):  # the sink blocks, then the window's, PAGES at a time
        i = i0 + page
        j = tl.where(i < sink_blocks, i, i - sink_blocks + first_window)
        held = length
        if SELECT:  # this head's i-th selected blocks; -1 (none) reads nothing
            j = tl.load(sel_ptr + b * stride_sb + h * stride_sh + i, mask=i < end, other=-1)
            held = tl.where(j >= 0, length, 0)
            j = tl.maximum(j, 0)
        block = tl.load(tables_ptr + b * stride_tb + j, mask=i < end, other=0).to(tl.int64)
        slot = j * BLOCK_SIZE + s
        visible = (i < end) & (slot < held) & ((slot < sinks) | (slot >= start))
        k_offs = block[:, None] * stride_kn + s[:, None] * stride_ks + h * stride_kh + dk[None, :]
        v_offs = block[:, None] * stride_vn + s[:, None] * stride_vs + h * stride_vh + d[None, :]
        k = tl.load(k_ptr + k_offs, mask=visible[:, None] & (dk < KEY_DIM)[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + v_offs, mask=visible[:, None], other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k))
        if NEWEST:
            scores += tl.where((slot == length - 1)[None, :], newest[:, None], 0.0)
        scores = tl.where(visible[None, :], scores, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(visible[None, :], tl.exp(scores - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    store_partial(m_ptr, l_ptr, acc_ptr, m_i, l_i, acc, b, h, split, splits, H, BLOCK_G, HEAD_DIM)


#: tokens each loop iteration of a program reads per KV head (whole pages): enough bytes in flight per load
TILE_TOKENS = 64


def paged_decode(query: Tensor, k_pages: Tensor, v_pages: Tensor, block_tables: Tensor, lens: Tensor,
                 starts: Tensor, sinks: Tensor, scale: float, splits: int | None = None, tile_tokens: int = TILE_TOKENS,
                 num_warps: int = 4, num_stages: int = 3, selected: Tensor | None = None,
                 newest: Tensor | None = None) -> Tensor:
    """query (B, Hq, Dk); k_pages (N, bs, H, Dk); v_pages (N, bs, H, Dv); block_tables (B, M); lens (B, H);
    starts, sinks (B,) -> (B, Hq, Dv).

    ``splits``: programs sharing each (sequence, KV head)'s blocks (None: enough to fill the GPU);
    ``tile_tokens``, ``num_warps``, ``num_stages``: the launch's shape (benchmarks/engine_decode_kernels.py sweeps them).
    ``selected`` (B, H, k): read only these block positions of the table per KV head (-1: none), see the module
    docstring; the window (``starts``, ``sinks``) still hides slots. ``newest`` (B, Hq): added to the scaled score of
    each head's slot ``lens - 1`` (see :func:`kvslim.kernels.paged_attention_ref.paged_decode_ref`).
    """
    batch, q_heads, key_dim = query.shape
    block_size, kv_heads, dim = k_pages.shape[1], k_pages.shape[2], v_pages.shape[-1]
    group = q_heads // kv_heads
    for name, value in (("block_size", block_size), ("value head_dim", dim)):
        if value & (value - 1):
            raise ValueError(f"the Triton paged kernel needs a power-of-two {name}, got {value}")
    query = query.contiguous()
    tables = block_tables.contiguous()
    pages = 1 << (max(1, tile_tokens // block_size).bit_length() - 1)  # whole pages, a power of two of them
    select = selected is not None
    sel = selected.contiguous() if select else lens  # any tensor: the kernel never reads it without SELECT
    top = sel.shape[2] if select else 0
    splits = plan_splits(batch, kv_heads, top if select else tables.shape[1], query.device, splits, pages)
    block_g = max(16, triton.next_power_of_2(group))
    scratch = partials(batch, kv_heads, splits, block_g, dim, query.device)
    bias = newest.contiguous() if newest is not None else lens  # any tensor: the kernel never reads it without NEWEST
    _paged_decode_kernel[(batch, kv_heads, splits)](
        query, k_pages, v_pages, *scratch, tables, lens, starts.contiguous(), sinks.contiguous(), sel, bias, scale,
        splits, top, query.stride(0), query.stride(1), tables.stride(0),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), v_pages.stride(0), v_pages.stride(1),
        v_pages.stride(2), lens.stride(0), sel.stride(0), sel.stride(1), bias.stride(0),
        H=kv_heads, GROUP=group, BLOCK_G=block_g, BLOCK_SIZE=block_size, KEY_DIM=key_dim,
        BLOCK_KD=max(16, triton.next_power_of_2(key_dim)), HEAD_DIM=dim, PAGES=pages, SELECT=select,
        NEWEST=newest is not None, num_warps=num_warps, num_stages=num_stages,
    )
    return combine(scratch, query.new_empty(batch, q_heads, dim), kv_heads, splits, block_g)
