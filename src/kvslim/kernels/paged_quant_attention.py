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
Each plane is dequantized in registers with the scales of its groups, runs or tokens (static fp8: of its
block, per head or one for all) and rounded to the query's dtype, so the numbers are those the Hugging
Face path attends over. Heads too small for planes of 16 channels (``tl.dot``'s least size: 2-bit codes
at head_dim 32, 4-bit at 16) unpack whole rows instead, by broadcasting each byte against its shifts.

Why planes: the first version interleaved shifted bytes with ``tl.join`` + ``tl.reshape``. That was
exact under the interpreter, and exact on the H100 too as long as the tile was only stored; but fed
to ``tl.dot``, Triton 3.6 on the H100 computed wrong attention (relative error ~1.5) for every
sub-byte format whose tile had fewer than 4096 elements: blocks of 16 slots at head_dim 64/128
(int4's default blocks) or head_dim 16-32, whatever the group size; int8/fp8 (nothing to unpack)
were always right. Unpacking by a broadcast and a reshape is right but 1.5-2.5x slower; planes need
no change of layout and run near the old speed (benchmarks/results/paged_quant_kernel_h100.json).

Speed (H100, Llama-3.1-8B layer, 8k-32k tokens per sequence): the kernel is bound by the work per token,
not the bytes (every format took about the same time). Each step therefore reads a tile of 64 tokens
(several blocks: the codes once for every plane, token scales once, a KIVI run's scales once per plane),
turns codes into floats by the 2**23 trick instead of a quarter-rate conversion, and with a 16-bit query
multiplies bf16/fp16 operands (exact products, float32 sums) instead of tf32, the weights in the query's
dtype as flash attention does; 8 programs per multiprocessor. 1.8-2.8x faster for kivi4/kivi2, 1.6-3.5x
for int4/int8/fp8 (the "planes_v2" section of the results file).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import triton
import triton.language as tl
import torch
from torch import Tensor

from .paged_quant import CodePages, Codes, QuantPages
from .paged_split import MIN_CHUNK, combine, partials, plan_splits

_KINDS = {"token": 0, "channel": 1, "fp8": 2, "fp8_e4m3": 3, "fp8_e5m2": 4}


@triton.jit
def _unpack(packed, BITS: tl.constexpr):
    """(T, W) bytes -> (T, W * 8 // BITS) codes: every byte broadcast against its codes' shifts, (T, W, 8 // BITS),
    then the last two axes merged, so channel ``c`` comes from byte ``c // (8/BITS)``."""
    PER: tl.constexpr = 8 // BITS
    shifts = (tl.arange(0, PER) * BITS).to(tl.uint8)
    codes = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (packed.shape[0], packed.shape[1] * PER))


@triton.jit
def _blocks(tables_ptr, b, stride_tb, i, hi, sink_blocks, first_window, IDX64: tl.constexpr):
    """Logical block positions ``i`` (any shape) of this split -> (physical block, table column, in range):
    the sink blocks come first, then the window's; positions past ``hi`` read block 0 (masked later)."""
    ok = i < hi
    j = tl.where(i < sink_blocks, i, i - sink_blocks + first_window)
    block = tl.maximum(tl.load(tables_ptr + b * stride_tb + j, mask=ok, other=0), 0)
    if IDX64:
        block = block.to(tl.int64)
    return block, j, ok


@triton.jit
def _scales(s_ptr, z_ptr, row, block, h, mask, KIND: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
            SCALES: tl.constexpr):
    """Per-token scales (and zeros) of a tile's rows, loaded once for every plane: (T, groups) for token groups,
    (T,) for fp8, and (T,) for static fp8 (each row's block's scale: ``SCALES`` per block, 1 or one per head);
    KIVI keys' per-run scales are loaded per plane (:func:`_plane`)."""
    if KIND == 0:
        NG: tl.constexpr = HEAD_DIM // GROUP
        offs = row[:, None] * NG + tl.arange(0, NG)[None, :]
        scale = tl.load(s_ptr + offs, mask=mask[:, None], other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + offs, mask=mask[:, None], other=0.0).to(tl.float32)
    elif KIND == 2:
        scale = tl.load(s_ptr + row, mask=mask, other=0.0).to(tl.float32)
        zero = scale
    elif KIND >= 3:
        if SCALES > 1:
            at = block * SCALES + h
        else:
            at = block
        scale = tl.load(s_ptr + at, mask=mask, other=0.0)
        zero = scale
    else:
        scale = 0.0
        zero = 0.0
    return scale, zero


@triton.jit
def _plane(raw, s_ptr, z_ptr, scale, zero, run_row, J: tl.constexpr, P: tl.constexpr, T: tl.constexpr,
           HEAD_DIM: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, dtype: tl.constexpr,
           LOWP: tl.constexpr):
    """Plane ``J`` of ``P`` of a tile of ``T`` token rows, dequantized: (T, HEAD_DIM // P) in ``dtype``, channels
    J, J + P, J + 2P... (masked rows: finite).

    ``raw`` is the rows' bytes as loaded (T, HEAD_DIM * BITS // 8), once for every plane; ``P`` the codes per
    byte (8 // BITS): byte ``w`` holds channel ``w * P + J`` at bit ``J * BITS``, so a plane is one shift of
    the bytes. ``P == 1`` with sub-byte codes (heads too small for planes of 16 channels) unpacks whole rows
    instead (:func:`_unpack`). Rounded to ``dtype`` (the query's), as the Hugging Face path attends over them, and
    kept there for a 16-bit ``tl.dot`` (``LOWP``), else returned as float32.
    """
    W: tl.constexpr = HEAD_DIM // P
    if KIND == 2 or KIND == 3:  # e4m3 bytes times the token's (fp8) or its block's (fp8_e4m3) scale
        x = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, None]
    elif KIND == 4:  # e5m2 bytes times the block's scale
        x = raw.to(tl.float8e5, bitcast=True).to(tl.float32) * scale[:, None]
    else:
        if P > 1:
            codes = (raw.to(tl.int32) >> (J * BITS)) & ((1 << BITS) - 1)
        elif BITS < 8:
            codes = _unpack(raw, BITS).to(tl.int32)
        else:
            codes = raw.to(tl.int32)
        # code -> float32 without an integer conversion (a quarter-rate instruction, the kernel's bottleneck):
        # 2**23 + code has the code as its low mantissa bits, exactly
        codes = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        if KIND == 0:  # per-token groups of GROUP channels, GROUP // P of them in this plane
            NG: tl.constexpr = HEAD_DIM // GROUP
            x = tl.reshape(codes, (T, NG, GROUP // P)) * scale[:, :, None] + zero[:, :, None]
        else:  # KIVI keys: (run, channel) scales for the tile's runs of GROUP slots
            RUNS: tl.constexpr = T // GROUP
            offs = run_row[:, None] * HEAD_DIM + (tl.arange(0, W) * P + J)[None, :]
            rs = tl.load(s_ptr + offs).to(tl.float32)
            rz = tl.load(z_ptr + offs).to(tl.float32)
            x = tl.reshape(codes, (RUNS, GROUP, W)) * rs[:, None, :] + rz[:, None, :]
        x = tl.reshape(x, (T, W))
    x = x.to(dtype)
    if not LOWP:
        x = x.to(tl.float32)
    return x


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
    K_SCALES: tl.constexpr, V_SCALES: tl.constexpr, BLOCKS: tl.constexpr, LOWP: tl.constexpr, IDX64: tl.constexpr,
):
    """Everything runs per plane (see :func:`_plane`): scores add up the planes' products, and each plane
    keeps its own slice of the output, written back to its channels at the end. Keys and values have the
    same code width ``BITS``, hence the same planes. Each step reads a tile of ``BLOCKS`` blocks (their codes
    once for every plane); with ``LOWP`` (a 16-bit query) the products take the query and the rounded tokens
    as they are (bf16/fp16 operands, float32 sums, the scale applied to the scores) and the weights in the
    query's dtype, as flash attention does."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    PER: tl.constexpr = 8 // BITS if HEAD_DIM * BITS // 8 >= 16 else 1  # planes of at least 16 channels, for tl.dot
    W: tl.constexpr = HEAD_DIM // PER
    BYTES: tl.constexpr = HEAD_DIM * BITS // 8
    T: tl.constexpr = BLOCKS * BLOCK_SIZE
    g = tl.arange(0, BLOCK_G)
    w = tl.arange(0, W)
    q_at = q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + w[None, :] * PER
    q_mask = (g < GROUP)[:, None]
    q0 = tl.load(q_at, mask=q_mask, other=0.0)
    dtype = q0.dtype
    if not LOWP:
        q0 = q0.to(tl.float32)
    q1, q2, q3 = q0, q0, q0
    if PER >= 2:
        q1 = tl.load(q_at + 1, mask=q_mask, other=0.0).to(q0.dtype)
    if PER == 4:
        q2 = tl.load(q_at + 2, mask=q_mask, other=0.0).to(q0.dtype)
        q3 = tl.load(q_at + 3, mask=q_mask, other=0.0).to(q0.dtype)
    length = tl.load(lens_ptr + b * stride_lb + h)
    start = tl.load(starts_ptr + b)
    sinks = tl.load(sinks_ptr + b)
    m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc0 = tl.zeros((BLOCK_G, W), tl.float32)
    acc1, acc2, acc3 = acc0, acc0, acc0
    t = tl.arange(0, T)
    sl = t % BLOCK_SIZE
    wb = tl.arange(0, BYTES)
    RUNS_T: tl.constexpr = T // K_GROUP if K_KIND == 1 else 1
    RUN_BLOCK: tl.constexpr = BLOCK_SIZE // K_GROUP if K_KIND == 1 else 1
    run = tl.arange(0, RUNS_T)
    sink_blocks = tl.minimum(tl.cdiv(sinks, BLOCK_SIZE), tl.cdiv(length, BLOCK_SIZE))
    first_window = tl.maximum(start // BLOCK_SIZE, sink_blocks)
    steps = sink_blocks + tl.cdiv(length, BLOCK_SIZE) - first_window
    chunk = tl.cdiv(tl.cdiv(steps, splits), BLOCKS) * BLOCKS  # this sequence's blocks spread over the splits
    lo = split * chunk
    hi = tl.minimum(steps, lo + chunk)
    for i0 in range(lo, hi, BLOCKS):  # the sink blocks, then the window's, a tile of BLOCKS at a time
        block, j, ok = _blocks(tables_ptr, b, stride_tb, i0 + t // BLOCK_SIZE, hi, sink_blocks, first_window, IDX64)
        slot = j * BLOCK_SIZE + sl
        visible = ok & (slot < length) & ((slot < sinks) | (slot >= start))
        row = (block * BLOCK_SIZE + sl) * H + h  # (slot, head) row of the codes and per-token scales
        run_row = run
        if K_KIND == 1:
            run_block, _, _ = _blocks(tables_ptr, b, stride_tb, i0 + run // RUN_BLOCK, hi, sink_blocks, first_window,
                                      IDX64)
            run_row = (run_block * RUN_BLOCK + run % RUN_BLOCK) * H + h
        k_raw = tl.load(kc_ptr + row[:, None] * BYTES + wb[None, :], mask=visible[:, None], other=0)
        v_raw = tl.load(vc_ptr + row[:, None] * BYTES + wb[None, :], mask=visible[:, None], other=0)
        ks, kz = _scales(ks_ptr, kz_ptr, row, block, h, visible, K_KIND, HEAD_DIM, K_GROUP, K_SCALES)
        vs, vz = _scales(vs_ptr, vz_ptr, row, block, h, visible, V_KIND, HEAD_DIM, V_GROUP, V_SCALES)
        k = _plane(k_raw, ks_ptr, kz_ptr, ks, kz, run_row, 0, PER, T, HEAD_DIM, K_KIND, BITS, K_GROUP, dtype, LOWP)
        scores = tl.dot(q0, tl.trans(k))
        if PER >= 2:
            k = _plane(k_raw, ks_ptr, kz_ptr, ks, kz, run_row, 1, PER, T, HEAD_DIM, K_KIND, BITS, K_GROUP, dtype, LOWP)
            scores += tl.dot(q1, tl.trans(k))
        if PER == 4:
            k = _plane(k_raw, ks_ptr, kz_ptr, ks, kz, run_row, 2, PER, T, HEAD_DIM, K_KIND, BITS, K_GROUP, dtype, LOWP)
            scores += tl.dot(q2, tl.trans(k))
            k = _plane(k_raw, ks_ptr, kz_ptr, ks, kz, run_row, 3, PER, T, HEAD_DIM, K_KIND, BITS, K_GROUP, dtype, LOWP)
            scores += tl.dot(q3, tl.trans(k))
        scores = tl.where(visible[None, :], scores * scale, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(visible[None, :], tl.exp(scores - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(q0.dtype)
        v = _plane(v_raw, vs_ptr, vz_ptr, vs, vz, run_row, 0, PER, T, HEAD_DIM, V_KIND, BITS, V_GROUP, dtype, LOWP)
        acc0 = acc0 * alpha[:, None] + tl.dot(p, v)
        if PER >= 2:
            v = _plane(v_raw, vs_ptr, vz_ptr, vs, vz, run_row, 1, PER, T, HEAD_DIM, V_KIND, BITS, V_GROUP, dtype, LOWP)
            acc1 = acc1 * alpha[:, None] + tl.dot(p, v)
        if PER == 4:
            v = _plane(v_raw, vs_ptr, vz_ptr, vs, vz, run_row, 2, PER, T, HEAD_DIM, V_KIND, BITS, V_GROUP, dtype, LOWP)
            acc2 = acc2 * alpha[:, None] + tl.dot(p, v)
            v = _plane(v_raw, vs_ptr, vz_ptr, vs, vz, run_row, 3, PER, T, HEAD_DIM, V_KIND, BITS, V_GROUP, dtype, LOWP)
            acc3 = acc3 * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    row = tl.load(rows_ptr + b).to(tl.int64)
    ring_len = tl.where(split == 0, tl.load(ring_lens_ptr + b * stride_rlb + h), 0)
    r = tl.arange(0, RING_T)
    for r0 in range(0, ring_len, RING_T):  # the newest tokens, in the model dtype (first split only)
        held = r0 + r < ring_len
        at = row * stride_rs + (r0 + r)[:, None] * stride_rc + h * stride_rh + w[None, :] * PER
        hm = held[:, None]
        scores = tl.dot(q0, tl.trans(tl.load(ring_k_ptr + at, mask=hm, other=0.0).to(q0.dtype)))
        if PER >= 2:
            scores += tl.dot(q1, tl.trans(tl.load(ring_k_ptr + at + 1, mask=hm, other=0.0).to(q0.dtype)))
        if PER == 4:
            scores += tl.dot(q2, tl.trans(tl.load(ring_k_ptr + at + 2, mask=hm, other=0.0).to(q0.dtype)))
            scores += tl.dot(q3, tl.trans(tl.load(ring_k_ptr + at + 3, mask=hm, other=0.0).to(q0.dtype)))
        scores = tl.where(held[None, :], scores * scale, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(held[None, :], tl.exp(scores - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(q0.dtype)
        acc0 = acc0 * alpha[:, None] + tl.dot(p, tl.load(ring_v_ptr + at, mask=hm, other=0.0).to(q0.dtype))
        if PER >= 2:
            acc1 = acc1 * alpha[:, None] + tl.dot(p, tl.load(ring_v_ptr + at + 1, mask=hm, other=0.0).to(q0.dtype))
        if PER == 4:
            acc2 = acc2 * alpha[:, None] + tl.dot(p, tl.load(ring_v_ptr + at + 2, mask=hm, other=0.0).to(q0.dtype))
            acc3 = acc3 * alpha[:, None] + tl.dot(p, tl.load(ring_v_ptr + at + 3, mask=hm, other=0.0).to(q0.dtype))
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
    """Whether this kernel reads the format: every page format (token groups, KIVI runs, fp8 with scales per token
    or static per block) of 2, 4 or 8 bits, keys and values of one width (the planes are shared)."""
    return keys.bits == values.bits and all(c.kind in _KINDS and c.bits in (2, 4, 8) for c in (keys, values))


def _pointers(pages: CodePages) -> tuple[Tensor, Tensor, Tensor]:
    return pages.codes, pages.scale, pages.scale if pages.zero is None else pages.zero


def _scales_per_block(codes: Codes, kv_heads: int) -> int:
    """Static fp8: scales each block keeps (one per head, or one); 1 (unused) for the other formats."""
    return kv_heads if codes.static and codes.per_head else 1


@dataclass(frozen=True)
class Launch:
    """How the kernel is launched: ``blocks`` per step (a tile of ``blocks * block_size`` tokens), the warps and
    pipelining stages per program, and programs in flight per multiprocessor (sets the splits)."""

    blocks: int = 2
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 8


def launch_for(block_size: int, bits: int, head_dim: int) -> Launch:
    """The default launch for a page format (H100 sweep at the Llama-3.1-8B shape, batches 14-32 of 8k-20k tokens:
    benchmarks/results/paged_quant_kernel_h100.json): tiles of 64 tokens, 4 warps, 8 programs per multiprocessor;
    two stages for sub-byte codes, three for bytes."""
    return Launch(blocks=max(1, 64 // block_size), num_stages=3 if bits == 8 else 2)


def _lowp(dtype: torch.dtype) -> bool:
    """16-bit products for a 16-bit query; not bf16 under Triton's interpreter, whose ``tl.dot`` multiplies bf16's
    bits as integers."""
    return dtype == torch.float16 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") != "1")


def paged_quant_decode(query: Tensor, pages: QuantPages, block_tables: Tensor, lens: Tensor, starts: Tensor,
                       sinks: Tensor, ring_k: Tensor, ring_v: Tensor, rows: Tensor, ring_lens: Tensor,
                       scale: float, splits: int | None = None, launch: Launch | None = None) -> Tensor:
    """query (B, Hq, D); one layer's ``pages``; block_tables (B, M); lens, ring_lens (B, H); starts, sinks, rows (B,);
    ring_k/ring_v (S, C, H, D) -> (B, Hq, D). ``splits``: programs sharing each (sequence, KV head)'s blocks
    (None: enough to fill the GPU); ``launch``: tile and launch settings (None: :func:`launch_for`)."""
    batch, q_heads, dim = query.shape
    block_size, kv_heads = pages.keys.codes.shape[1], pages.keys.codes.shape[2]
    for name, value in (("block_size", block_size), ("head_dim", dim)):
        if value & (value - 1) or value < 16:
            raise ValueError(f"the Triton quantized paged kernel needs a power-of-two {name} >= 16, got {value}")
    if ring_k.stride(-1) != 1 or ring_k.stride() != ring_v.stride():
        raise ValueError("the residual ring must be contiguous in head_dim, keys and values laid out alike")
    keys, values = pages.keys.spec, pages.values.spec
    if not triton_supports(keys, values):
        raise ValueError(f"the Triton quantized paged kernel cannot read {keys} keys with {values} values")
    launch = launch or launch_for(block_size, keys.bits, dim)
    query = query.contiguous()
    tables = block_tables.contiguous()
    if splits is None and query.device.type == "cuda":
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count
        splits = min(triton.cdiv(launch.programs_per_sm * sms, max(1, batch * kv_heads)),
                     triton.cdiv(tables.shape[1], MIN_CHUNK))
    splits = plan_splits(batch, kv_heads, tables.shape[1], query.device, splits)
    block_g = max(16, triton.next_power_of_2(q_heads // kv_heads))
    scratch = partials(batch, kv_heads, splits, block_g, dim, query.device)
    idx64 = max(t.numel() for t in pages.tensors()) >= 2**31
    _paged_quant_decode_kernel[(batch, kv_heads, splits)](
        query, *scratch, tables, lens, starts.contiguous(), sinks.contiguous(), scale, splits,
        *_pointers(pages.keys), *_pointers(pages.values),
        ring_k, ring_v, rows.contiguous(), ring_lens,
        query.stride(0), query.stride(1), tables.stride(0), lens.stride(0),
        ring_lens.stride(0), ring_k.stride(0), ring_k.stride(1), ring_k.stride(2),
        H=kv_heads, GROUP=q_heads // kv_heads, BLOCK_G=block_g, BLOCK_SIZE=block_size, HEAD_DIM=dim, RING_T=16,
        BITS=keys.bits, K_KIND=_KINDS[keys.kind], K_GROUP=keys.group, V_KIND=_KINDS[values.kind], V_GROUP=values.group,
        K_SCALES=_scales_per_block(keys, kv_heads), V_SCALES=_scales_per_block(values, kv_heads),
        BLOCKS=launch.blocks, LOWP=_lowp(query.dtype), IDX64=idx64,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return combine(scratch, query.new_empty(batch, q_heads, dim), kv_heads, splits, block_g)
