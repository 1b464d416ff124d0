"""Triton paged decode attention: one new query per sequence over its blocks, online softmax.

Same contract as :func:`kvslim.kernels.paged_attention_ref.paged_decode_ref` (the tested reference).
One program per (sequence, KV head) serves the whole query group of that head (GQA), so each key
and value page is read once per group. Blocks a sliding window has passed are never touched: the
loop runs over the sink blocks, then from the window's first block to the last written one.
Pages are typically bf16; they are widened to float32 on load, so scores, softmax and both products
are float32 (decode reads each page once: it is bound by memory, not by the multiplies).
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, starts_ptr, sinks_ptr, scale,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_tb,
    stride_kn, stride_ks, stride_kh, stride_lb,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    q_rows = h * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + q_rows[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    q = q.to(tl.float32) * scale
    length = tl.load(lens_ptr + b * stride_lb + h)
    start = tl.load(starts_ptr + b)
    sinks = tl.load(sinks_ptr + b)
    m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    s = tl.arange(0, BLOCK_SIZE)
    sink_blocks = tl.minimum(tl.cdiv(sinks, BLOCK_SIZE), tl.cdiv(length, BLOCK_SIZE))
    first_window = tl.maximum(start // BLOCK_SIZE, sink_blocks)
    steps = sink_blocks + tl.cdiv(length, BLOCK_SIZE) - first_window
    for i in range(0, steps):  # the sink blocks, then the window's blocks
        j = tl.where(i < sink_blocks, i, i - sink_blocks + first_window)
        block = tl.load(tables_ptr + b * stride_tb + j).to(tl.int64)
        slot = j * BLOCK_SIZE + s
        visible = (slot < length) & ((slot < sinks) | (slot >= start))
        offs = block * stride_kn + s[:, None] * stride_ks + h * stride_kh + d[None, :]
        k = tl.load(k_ptr + offs, mask=visible[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=visible[:, None], other=0.0).to(tl.float32)
        scores = tl.where(visible[None, :], tl.dot(q, tl.trans(k)), -1.0e30)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(visible[None, :], tl.exp(scores - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1.0e-30)[:, None]
    tl.store(out_ptr + b * stride_ob + q_rows[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(g < GROUP)[:, None])


def paged_decode(query: Tensor, k_pages: Tensor, v_pages: Tensor, block_tables: Tensor, lens: Tensor,
                 starts: Tensor, sinks: Tensor, scale: float) -> Tensor:
    """query (B, Hq, D); pages (N, bs, H, D); block_tables (B, M); lens (B, H); starts, sinks (B,) -> (B, Hq, D)."""
    batch, q_heads, dim = query.shape
    block_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = q_heads // kv_heads
    for name, value in (("block_size", block_size), ("head_dim", dim)):
        if value & (value - 1):
            raise ValueError(f"the Triton paged kernel needs a power-of-two {name}, got {value}")
    query = query.contiguous()
    tables = block_tables.contiguous()
    out = query.new_empty(batch, q_heads, dim)
    _paged_decode_kernel[(batch, kv_heads)](
        query, k_pages, v_pages, out, tables, lens, starts.contiguous(), sinks.contiguous(), scale,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), lens.stride(0),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size, HEAD_DIM=dim,
    )
    return out
