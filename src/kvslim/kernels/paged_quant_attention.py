"""Triton paged decode attention over quantized pages plus the full-precision residual ring.

Same contract as :func:`kvslim.kernels.paged_quant_attention_ref.paged_quant_decode_ref`. Like the
model-dtype kernel (:mod:`kvslim.kernels.paged_attention`), one program per (sequence, KV head, split)
serves the whole query group, walks its chunk of the sink blocks then the window's blocks, and keeps
an online softmax; the first split also folds in the sequence's ring row. Decode reads every page
once, so it is bound by the bytes moved, which quantization divides.

Codes are never interleaved back into channel order. A byte holds ``P = 8 // bits`` codes, channel
``c`` in byte ``c // P`` at bit ``(c % P) * bits`` (:func:`kvslim.cache.quantized.pack`), so the row's
bytes as loaded, shifted by ``J * bits``, are *plane* ``J``: channels ``J, J + P, ...``. The kernel
works plane by plane: the query is loaded as the same planes, a block's scores are the sum of the
planes' products, and the output keeps one slice per plane, stored back to its channels at the end.
Each plane is dequantized in registers with the scales of its groups, runs or tokens and rounded to
the query's dtype, so the numbers are those the Hugging Face path attends over. Heads too small for
planes of 16 channels (``tl.dot``'s least size: 2-bit codes at head_dim 32, 4-bit at 16) unpack whole
rows instead, by broadcasting each byte against its shifts.

Why planes: the first version interleaved shifted bytes with ``tl.join`` + ``tl.reshape``. That was
exact under the interpreter, and exact on the H100 too as long as the tile was only stored; but fed
to ``tl.dot``, Triton 3.6 on the H100 computed wrong attention (relative error ~1.5) for every
sub-byte format whose tile had fewer than 4096 elements: blocks of 16 slots at head_dim 64/128
(int4's default blocks) or head_dim 16-32, whatever the group size; int8/fp8 (nothing to unpack)
were always right. Unpacking by a broadcast and a reshape is right but 1.5-2.5x slower; planes need
no change of layout and run near the old speed (benchmarks/results/paged_quant_kernel_h100.json).
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .paged_quant import CodePages, Codes, QuantPages
from .paged_split import combine, partials, plan_splits

_KINDS = {"token": 0, "channel": 1, "fp8": 2}


@triton.jit
def _unpack(packed, BITS: tl.constexpr):
    """(T, W) bytes -> (T, W * 8 // BITS) codes: every byte broadcast against its codes' shifts, (T, W, 8 // BITS),
    then the last two axes merged, so channel ``c`` comes from byte ``c // (8/BITS)``."""
    PER: tl.constexpr = 8 // BITS
    shifts = (tl.arange(0, PER) * BITS).to(tl.uint8)
    codes = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (packed.shape[0], packed.shape[1] * PER))


@triton.jit
def _plane(c_ptr, s_ptr, z_ptr, block, s, h, mask, J: tl.constexpr, P: tl.constexpr, H: tl.constexpr,
           BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
           GROUP: tl.constexpr, dtype: tl.constexpr):
    """Plane ``J`` of ``P`` of head ``h``'s keys or values in ``block``: (BLOCK_SIZE, HEAD_DIM // P) float32, channels
    J, J + P, J + 2P... (masked slots are 0).

    ``P`` is the number of codes per byte (8 // BITS): byte ``w`` holds channel ``w * P + J`` at bit ``J * BITS``,
    so a plane is one shift of the bytes as loaded. ``P == 1`` with sub-byte codes (heads too small for
    planes of 16 channels) unpacks whole rows instead (:func:`_unpack`). Rounded to ``dtype`` (the query's), as the
    Hugging Face path attends over them.
    """
    W: tl.constexpr = HEAD_DIM // P
    w = tl.arange(0, W)
    row = (block * BLOCK_SIZE + s) * H + h  # (slot, head) row of the codes and per-token scales
    if KIND == 2:  # fp8: e4m3 bytes times one scale per token
        codes = tl.load(c_ptr + row[:, None] * HEAD_DIM + w[None, :], mask=mask[:, None], other=0)
        x = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        x = x * tl.load(s_ptr + row, mask=mask, other=0.0).to(tl.float32)[:, None]
    else:
        BYTES: tl.constexpr = HEAD_DIM * BITS // 8
        if P > 1:
            codes = tl.load(c_ptr + row[:, None] * BYTES + w[None, :], mask=mask[:, None], other=0)
            codes = (codes >> (J * BITS)) & ((1 << BITS) - 1)
        elif BITS < 8:
            wb = tl.arange(0, BYTES)
            codes = _unpack(tl.load(c_ptr + row[:, None] * BYTES + wb[None, :], mask=mask[:, None], other=0), BITS)
        else:
            codes = tl.load(c_ptr + row[:, None] * BYTES + w[None, :], mask=mask[:, None], other=0)
        codes = codes.to(tl.float32)
        if KIND == 0:  # per-token groups of GROUP channels, GROUP // P of them in this plane
            NG: tl.constexpr = HEAD_DIM // GROUP
            offs = row[:, None] * NG + tl.arange(0, NG)[None, :]
            scale = tl.load(s_ptr + offs, mask=mask[:, None], other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + offs, mask=mask[:, None], other=0.0).to(tl.float32)
            x = tl.reshape(codes, (BLOCK_SIZE, NG, GROUP // P)) * scale[:, :, None] + zero[:, :, None]
        else:  # KIVI keys: (run, channel) scales for the block's runs of GROUP slots
            RUNS: tl.constexpr = BLOCK_SIZE // GROUP
            offs = ((block * RUNS + tl.arange(0, RUNS)) * H + h)[:, None] * HEAD_DIM + (w * P + J)[None, :]
            scale = tl.load(s_ptr + offs).to(tl.float32)
            zero = tl.load(z_ptr + offs).to(tl.float32)
            x = tl.reshape(codes, (RUNS, GROUP, W)) * scale[:, None, :] + zero[:, None, :]
        x = tl.reshape(x, (BLOCK_SIZE, W))
    return x.to(dtype).to(tl.float32)


@triton.jit
def _paged_quant_decode_kernel(
    q_ptr, m_ptr, l_ptr, acc_ptr, tables_ptr, lens_ptr, starts_ptr, sinks_ptr, scale, splits,
    kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
    ring_k_ptr, ring_v_ptr, rows_ptr, ring_lens_ptr,
    stride_qb, stride_qh, stride_tb, stride_lb, stride_rlb,
    stride_rs, stride_rc, stride_rh,
    H: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    RING_T: tl.constexpr, BITS: tl.constexpr,
    K_KIND: tl.constexpr, K_GROUP: tl.constexpr, V_KIND: tl.constexpr, V_GROUP: tl.constexpr,
):
    """Everything runs per plane (see :func:`_plane`): scores add up the planes' products, and each plane
    keeps its own slice of the output, written back to its channels at the end. Keys and values have the
    same code width ``BITS``, hence the same planes."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    PER: tl.constexpr = 8 // BITS if HEAD_DIM * BITS // 8 >= 16 else 1  # planes of at least 16 channels, for tl.dot
    W: tl.constexpr = HEAD_DIM // PER
    g = tl.arange(0, BLOCK_G)
    w = tl.arange(0, W)
    q_at = q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + w[None, :] * PER
    q_mask = (g < GROUP)[:, None]
    q0 = tl.load(q_at, mask=q_mask, other=0.0)
    dtype = q0.dtype
    q0 = q0.to(tl.float32) * scale
    q1, q2, q3 = q0, q0, q0
    if PER >= 2:
        q1 = tl.load(q_at + 1, mask=q_mask, other=0.0).to(tl.float32) * scale
    if PER == 4:
        q2 = tl.load(q_at + 2, mask=q_mask, other=0.0).to(tl.float32) * scale
        q3 = tl.load(q_at + 3, mask=q_mask, other=0.0).to(tl.float32) * scale
    length = tl.load(lens_ptr + b * stride_lb + h)
    start = tl.load(starts_ptr + b)
    sinks = tl.load(sinks_ptr + b)
    m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc0 = tl.zeros((BLOCK_G, W), tl.float32)
    acc1, acc2, acc3 = acc0, acc0, acc0
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
        k = _plane(kc_ptr, ks_ptr, kz_ptr, block, s, h, visible, 0, PER, H, BLOCK_SIZE, HEAD_DIM,
                   K_KIND, BITS, K_GROUP, dtype)
        scores = tl.dot(q0, tl.trans(k))
        if PER >= 2:
            k = _plane(kc_ptr, ks_ptr, kz_ptr, block, s, h, visible, 1, PER, H, BLOCK_SIZE, HEAD_DIM,
                       K_KIND, BITS, K_GROUP, dtype)
            scores += tl.dot(q1, tl.trans(k))
        if PER == 4:
            k = _plane(kc_ptr, ks_ptr, kz_ptr, block, s, h, visible, 2, PER, H, BLOCK_SIZE, HEAD_DIM,
                       K_KIND, BITS, K_GROUP, dtype)
            scores += tl.dot(q2, tl.trans(k))
            k = _plane(kc_ptr, ks_ptr, kz_ptr, block, s, h, visible, 3, PER, H, BLOCK_SIZE, HEAD_DIM,
                       K_KIND, BITS, K_GROUP, dtype)
            scores += tl.dot(q3, tl.trans(k))
        scores = tl.where(visible[None, :], scores, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(visible[None, :], tl.exp(scores - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _plane(vc_ptr, vs_ptr, vz_ptr, block, s, h, visible, 0, PER, H, BLOCK_SIZE, HEAD_DIM,
                   V_KIND, BITS, V_GROUP, dtype)
        acc0 = acc0 * alpha[:, None] + tl.dot(p, v)
        if PER >= 2:
            v = _plane(vc_ptr, vs_ptr, vz_ptr, block, s, h, visible, 1, PER, H, BLOCK_SIZE, HEAD_DIM,
                       V_KIND, BITS, V_GROUP, dtype)
            acc1 = acc1 * alpha[:, None] + tl.dot(p, v)
        if PER == 4:
            v = _plane(vc_ptr, vs_ptr, vz_ptr, block, s, h, visible, 2, PER, H, BLOCK_SIZE, HEAD_DIM,
                       V_KIND, BITS, V_GROUP, dtype)
            acc2 = acc2 * alpha[:, None] + tl.dot(p, v)
            v = _plane(vc_ptr, vs_ptr, vz_ptr, block, s, h, visible, 3, PER, H, BLOCK_SIZE, HEAD_DIM,
                       V_KIND, BITS, V_GROUP, dtype)
            acc3 = acc3 * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    row = tl.load(rows_ptr + b).to(tl.int64)
    ring_len = tl.where(split == 0, tl.load(ring_lens_ptr + b * stride_rlb + h), 0)
    r = tl.arange(0, RING_T)
    for r0 in range(0, ring_len, RING_T):  # the newest tokens, in the model dtype (first split only)
        held = r0 + r < ring_len
        at = row * stride_rs + (r0 + r)[:, None] * stride_rc + h * stride_rh + w[None, :] * PER
        hm = held[:, None]
        scores = tl.dot(q0, tl.trans(tl.load(ring_k_ptr + at, mask=hm, other=0.0).to(tl.float32)))
        if PER >= 2:
            scores += tl.dot(q1, tl.trans(tl.load(ring_k_ptr + at + 1, mask=hm, other=0.0).to(tl.float32)))
        if PER == 4:
            scores += tl.dot(q2, tl.trans(tl.load(ring_k_ptr + at + 2, mask=hm, other=0.0).to(tl.float32)))
            scores += tl.dot(q3, tl.trans(tl.load(ring_k_ptr + at + 3, mask=hm, other=0.0).to(tl.float32)))
        scores = tl.where(held[None, :], scores, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(held[None, :], tl.exp(scores - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc0 = acc0 * alpha[:, None] + tl.dot(p, tl.load(ring_v_ptr + at, mask=hm, other=0.0).to(tl.float32))
        if PER >= 2:
            acc1 = acc1 * alpha[:, None] + tl.dot(p, tl.load(ring_v_ptr + at + 1, mask=hm, other=0.0).to(tl.float32))
        if PER == 4:
            acc2 = acc2 * alpha[:, None] + tl.dot(p, tl.load(ring_v_ptr + at + 2, mask=hm, other=0.0).to(tl.float32))
            acc3 = acc3 * alpha[:, None] + tl.dot(p, tl.load(ring_v_ptr + at + 3, mask=hm, other=0.0).to(tl.float32))
        m_i = m_new
    rows = ((b * H + h) * splits + split) * BLOCK_G + g  # the layout of paged_split.store_partial
    tl.store(m_ptr + rows, m_i)
    tl.store(l_ptr + rows, l_i)
    out = acc_ptr + rows[:, None] * HEAD_DIM + w[None, :] * PER
    tl.store(out, acc0)
    if PER >= 2:
        tl.store(out + 1, acc1)
    if PER == 4:
        tl.store(out + 2, acc2)
        tl.store(out + 3, acc3)


def triton_supports(keys: Codes, values: Codes) -> bool:
    """Whether this kernel reads the format: every page format (token groups, KIVI runs, fp8) of 2, 4 or 8 bits,
    keys and values of one width (the planes are shared)."""
    return keys.bits == values.bits and all(c.kind in _KINDS and c.bits in (2, 4, 8) for c in (keys, values))


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
    if not triton_supports(keys, values):
        raise ValueError(f"the Triton quantized paged kernel cannot read {keys} keys with {values} values")
    _paged_quant_decode_kernel[(batch, kv_heads, splits)](
        query, *scratch, tables, lens, starts.contiguous(), sinks.contiguous(), scale, splits,
        *_pointers(pages.keys), *_pointers(pages.values),
        ring_k, ring_v, rows.contiguous(), ring_lens,
        query.stride(0), query.stride(1), tables.stride(0), lens.stride(0),
        ring_lens.stride(0), ring_k.stride(0), ring_k.stride(1), ring_k.stride(2),
        H=kv_heads, GROUP=q_heads // kv_heads, BLOCK_G=block_g, BLOCK_SIZE=block_size, HEAD_DIM=dim, RING_T=16,
        BITS=keys.bits, K_KIND=_KINDS[keys.kind], K_GROUP=keys.group, V_KIND=_KINDS[values.kind], V_GROUP=values.group,
    )
    return combine(scratch, query.new_empty(batch, q_heads, dim), kv_heads, splits, block_g)
