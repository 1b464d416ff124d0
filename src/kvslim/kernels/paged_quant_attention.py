"""Triton paged decode attention over quantized pages plus the full-precision residual ring.

Same contract as :func:`kvslim.kernels.paged_quant_attention_ref.paged_quant_decode_ref`. Like the
model-dtype kernel (:mod:`kvslim.kernels.paged_attention`), one program per (sequence, KV head, split)
serves the whole query group, walks its chunk of the sink blocks then the window's blocks, and keeps
an online softmax; the first split also folds in the sequence's ring row. Each block's codes are
loaded once as contiguous bytes, unpacked by shifts (channel ``c`` sits in byte ``c // (8/bits)``,
lowest bits first, as :func:`kvslim.cache.quantized.pack` writes it) and dequantized in registers with
the scales of their group, run or token (loaded once each and broadcast), then rounded to the query's
dtype so the numbers are those the Hugging Face path attends over. Decode reads every page once, so it
is bound by the bytes moved, which quantization divides.

Unpacking broadcasts each byte against its codes' shifts and merges the (byte, code) axes. An earlier
version interleaved the shifted bytes with ``tl.join`` + ``tl.reshape``: exact under the interpreter
and, alone, exact on the H100 too, but once that tile fed ``tl.dot`` Triton 3.6 computed wrong
attention (relative error ~1.5) for every sub-byte format whose tile had fewer than 4096 elements:
blocks of 16 slots at head_dim 64/128 (int4's default blocks), or head_dim 16-32; group size played
no part, and int8/fp8 (no unpacking) were always right (benchmarks/results/paged_quant_kernel_h100.json).
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .paged_quant import CodePages, Codes, QuantPages
from .paged_split import combine, partials, plan_splits, store_partial

_KINDS = {"token": 0, "channel": 1, "fp8": 2}


@triton.jit
def _unpack(packed, BITS: tl.constexpr):
    """(T, W) bytes -> (T, W * 8 // BITS) codes: every byte broadcast against its codes' shifts, (T, W, 8 // BITS),
    then the last two axes merged, so channel ``c`` comes from byte ``c // (8/BITS)`` (see the module docstring)."""
    if BITS == 8:
        codes = packed
    else:
        PER: tl.constexpr = 8 // BITS
        shifts = (tl.arange(0, PER) * BITS).to(tl.uint8)
        codes = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, (packed.shape[0], packed.shape[1] * PER))
    return codes


@triton.jit
def _dequantize(c_ptr, s_ptr, z_ptr, block, s, h, mask, H: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                HEAD_DIM: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr):
    """(BLOCK_SIZE, HEAD_DIM) float32 keys or values of head ``h`` in ``block`` (slots ``s``; masked ones are 0)."""
    d = tl.arange(0, HEAD_DIM)
    row = (block * BLOCK_SIZE + s) * H + h  # (slot, head) row of the codes and per-token scales
    if KIND == 2:  # fp8: e4m3 bytes times one scale per token
        codes = tl.load(c_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=mask[:, None], other=0)
        x = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        x = x * tl.load(s_ptr + row, mask=mask, other=0.0).to(tl.float32)[:, None]
    else:
        W: tl.constexpr = HEAD_DIM * BITS // 8
        packed = tl.load(c_ptr + row[:, None] * W + tl.arange(0, W)[None, :], mask=mask[:, None], other=0)
        codes = _unpack(packed, BITS).to(tl.float32)
        if KIND == 0:  # per-token groups of GROUP channels: (slot, group) scales
            NG: tl.constexpr = HEAD_DIM // GROUP
            offs = row[:, None] * NG + tl.arange(0, NG)[None, :]
            scale = tl.load(s_ptr + offs, mask=mask[:, None], other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + offs, mask=mask[:, None], other=0.0).to(tl.float32)
            x = tl.reshape(codes, (BLOCK_SIZE, NG, GROUP)) * scale[:, :, None] + zero[:, :, None]
        else:  # KIVI keys: (run, channel) scales for the block's runs of GROUP slots
            RUNS: tl.constexpr = BLOCK_SIZE // GROUP
            offs = ((block * RUNS + tl.arange(0, RUNS)) * H + h)[:, None] * HEAD_DIM + d[None, :]
            scale = tl.load(s_ptr + offs).to(tl.float32)
            zero = tl.load(z_ptr + offs).to(tl.float32)
            x = tl.reshape(codes, (RUNS, GROUP, HEAD_DIM)) * scale[:, None, :] + zero[:, None, :]
        x = tl.reshape(x, (BLOCK_SIZE, HEAD_DIM))
    return x


@triton.jit
def _paged_quant_decode_kernel(
    q_ptr, m_ptr, l_ptr, acc_ptr, tables_ptr, lens_ptr, starts_ptr, sinks_ptr, scale, splits,
    kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
    ring_k_ptr, ring_v_ptr, rows_ptr, ring_lens_ptr,
    stride_qb, stride_qh, stride_tb, stride_lb, stride_rlb,
    stride_rs, stride_rc, stride_rh,
    H: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    RING_T: tl.constexpr,
    K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr,
    V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    q_rows = h * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + q_rows[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    dtype = q.dtype
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
    chunk = tl.cdiv(steps, splits)  # this sequence's blocks spread evenly over the splits
    for i in range(split * chunk, tl.minimum(steps, (split + 1) * chunk)):  # the sink blocks, then the window's
        j = tl.where(i < sink_blocks, i, i - sink_blocks + first_window)
        block = tl.load(tables_ptr + b * stride_tb + j).to(tl.int64)
        slot = j * BLOCK_SIZE + s
        visible = (slot < length) & ((slot < sinks) | (slot >= start))
        k = _dequantize(kc_ptr, ks_ptr, kz_ptr, block, s, h, visible, H, BLOCK_SIZE, HEAD_DIM, K_KIND, K_BITS, K_GROUP)
        v = _dequantize(vc_ptr, vs_ptr, vz_ptr, block, s, h, visible, H, BLOCK_SIZE, HEAD_DIM, V_KIND, V_BITS, V_GROUP)
        k = k.to(dtype).to(tl.float32)
        v = v.to(dtype).to(tl.float32)
        scores = tl.where(visible[None, :], tl.dot(q, tl.trans(k)), -1.0e30)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(visible[None, :], tl.exp(scores - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    row = tl.load(rows_ptr + b).to(tl.int64)
    ring_len = tl.where(split == 0, tl.load(ring_lens_ptr + b * stride_rlb + h), 0)
    r = tl.arange(0, RING_T)
    for r0 in range(0, ring_len, RING_T):  # the newest tokens, in the model dtype (first split only)
        held = r0 + r < ring_len
        offs = row * stride_rs + (r0 + r)[:, None] * stride_rc + h * stride_rh + d[None, :]
        k = tl.load(ring_k_ptr + offs, mask=held[:, None], other=0.0).to(tl.float32)
        v = tl.load(ring_v_ptr + offs, mask=held[:, None], other=0.0).to(tl.float32)
        scores = tl.where(held[None, :], tl.dot(q, tl.trans(k)), -1.0e30)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(held[None, :], tl.exp(scores - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    store_partial(m_ptr, l_ptr, acc_ptr, m_i, l_i, acc, b, h, split, splits, H, BLOCK_G, HEAD_DIM)


def triton_supports(keys: Codes, values: Codes) -> bool:
    """Whether this kernel reads the format: every page format (token groups, KIVI runs, fp8) of 2, 4 or 8 bits."""
    return all(c.kind in _KINDS and c.bits in (2, 4, 8) for c in (keys, values))


def _pointers(pages: CodePages) -> tuple[Tensor, Tensor, Tensor]:
    return pages.codes, pages.scale, pages.scale if pages.zero is None else pages.zero


def paged_quant_decode(query: Tensor, pages: QuantPages, block_tables: Tensor, lens: Tensor, starts: Tensor,
                       sinks: Tensor, ring_k: Tensor, ring_v: Tensor, rows: Tensor, ring_lens: Tensor,
                       scale: float, splits: int | None = None) -> Tensor:
    """query (B, Hq, D); one layer's ``pages``; block_tables (B, M); lens, ring_lens (B, H); starts, sinks, rows (B,);
    ring_k/ring_v (S, C, H, D) -> (B, Hq, D). ``splits``: programs sharing each (sequence, KV head)'s blocks
    (None: enough to fill the GPU)."""
    batch, q_heads, dim = query.shape
    block_size, kv_heads = pages.keys.codes.shape[1], pages.keys.codes.shape[2]
    for name, value in (("block_size", block_size), ("head_dim", dim)):
        if value & (value - 1) or value < 16:
            raise ValueError(f"the Triton quantized paged kernel needs a power-of-two {name} >= 16, got {value}")
    if ring_k.stride(-1) != 1 or ring_k.stride() != ring_v.stride():
        raise ValueError("the residual ring must be contiguous in head_dim, keys and values laid out alike")
    query = query.contiguous()
    tables = block_tables.contiguous()
    splits = plan_splits(batch, kv_heads, tables.shape[1], query.device, splits)
    block_g = max(16, triton.next_power_of_2(q_heads // kv_heads))
    scratch = partials(batch, kv_heads, splits, block_g, dim, query.device)
    keys, values = pages.keys.spec, pages.values.spec
    _paged_quant_decode_kernel[(batch, kv_heads, splits)](
        query, *scratch, tables, lens, starts.contiguous(), sinks.contiguous(), scale, splits,
        *_pointers(pages.keys), *_pointers(pages.values),
        ring_k, ring_v, rows.contiguous(), ring_lens,
        query.stride(0), query.stride(1), tables.stride(0), lens.stride(0),
        ring_lens.stride(0), ring_k.stride(0), ring_k.stride(1), ring_k.stride(2),
        H=kv_heads, GROUP=q_heads // kv_heads, BLOCK_G=block_g, BLOCK_SIZE=block_size, HEAD_DIM=dim, RING_T=16,
        K_KIND=_KINDS[keys.kind], K_BITS=keys.bits, K_GROUP=keys.group,
        V_KIND=_KINDS[values.kind], V_BITS=values.bits, V_GROUP=values.group,
    )
    return combine(scratch, query.new_empty(batch, q_heads, dim), kv_heads, splits, block_g)
