"""Triton decode attention straight from packed KIVI or per-token integer KV codes.

One query per sequence (decoding) attends over a :class:`~kvslim.cache.quantized.QuantizedSegment` whose
keys are KIVI runs (:class:`ChannelGroups`) or per-token groups (:class:`TokenGroups`) and whose values
are per-token groups, with 2-, 4- or 8-bit codes. Each program serves one (sequence, KV head) and its
whole query group (GQA), so every code is read once per group; it loads packed bytes, unpacks and
dequantizes them in registers (no dequantized copy is ever written) and keeps an online softmax. Long
contexts are split over tokens into several programs per head (flash-decoding), whose partial results
a second small kernel merges. Same contract as :func:`kvslim.kernels.quant_decode_ref.quant_decode_ref`.

Dequantized keys and values are rounded to the query's dtype (bf16/fp16) before the tensor-core products,
as the cache's ``dense()`` would hand them to attention; scores and the softmax are float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..cache.quantized import ChannelGroups, QuantizedSegment, TokenGroups


@triton.jit
def _unpack(ptr, rows, mask, D: tl.constexpr, BITS: tl.constexpr):
    """(BLOCK_T, D) float32 codes of ``rows``: contiguous packed bytes, unpacked by shifting and interleaving."""
    packed = tl.load(ptr + rows[:, None] * (D * BITS // 8) + tl.arange(0, D * BITS // 8)[None, :],
                     mask=mask[:, None], other=0)
    if BITS == 8:
        codes = packed
    elif BITS == 4:  # byte j holds channels 2j (low nibble) and 2j+1
        codes = _interleave(packed & 15, packed >> 4)
    else:  # byte j holds channels 4j..4j+3, two bits each from the lowest
        codes = _interleave(_interleave(packed & 3, (packed >> 4) & 3), _interleave((packed >> 2) & 3, packed >> 6))
    return codes.to(tl.float32)


@triton.jit
def _interleave(a, b):
    """(R, C), (R, C) -> (R, 2C) as a0 b0 a1 b1 ...: ``tl.interleave`` spelled with core ops, which the
    interpreter also runs when triton was imported before ``TRITON_INTERPRET`` was set."""
    return tl.reshape(tl.join(a, b), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _dequant_tokens(codes, scale_ptr, zero_ptr, rows, mask, D: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    """Per-token groups: ``GROUP`` consecutive channels of a token share one scale and zero point."""
    NG: tl.constexpr = D // GROUP
    offs = rows[:, None] * NG + tl.arange(0, NG)[None, :]
    scale = tl.load(scale_ptr + offs, mask=mask[:, None], other=0).to(tl.float32)
    zero = tl.load(zero_ptr + offs, mask=mask[:, None], other=0).to(tl.float32)
    x = tl.reshape(codes, (BLOCK_T, NG, GROUP)) * scale[:, :, None] + zero[:, :, None]
    return tl.reshape(x, (BLOCK_T, D))


@triton.jit
def _operand(x, dtype: tl.constexpr, FP32: tl.constexpr):
    """A tensor-core operand: ``x`` rounded to ``dtype``; float32 under the interpreter (see :func:`quant_decode`)."""
    if FP32:
        y = x.to(tl.float32)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _decode_split(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, rows_ptr, runs_ptr, lens_ptr,
                  m_ptr, l_ptr, acc_ptr, qk_scale, chunk,
                  GQ: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr, KGROUP: tl.constexpr,
                  KIVI: tl.constexpr, RUNS: tl.constexpr, VBITS: tl.constexpr, VGROUP: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS: tl.constexpr, FP32_DOT: tl.constexpr):
    """Online softmax of one (sequence, KV head)'s query group over its tokens [split*chunk, (split+1)*chunk).

    KIVI keys with ``RUNS > 0`` are whole runs of ``KGROUP`` tokens (a power of two) and tiles start on run
    boundaries, so each tile loads the scales of its ``RUNS`` runs once and broadcasts them; with
    ``RUNS == 0`` (runs left partial by eviction) ``runs_ptr`` gives every token's run.
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.load(lens_ptr + bh)
    row0 = tl.load(rows_ptr + bh)
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, D)
    t = tl.arange(0, BLOCK_T)
    dtype = q_ptr.dtype.element_ty
    q = _operand(tl.load(q_ptr + (bh * GQ + h)[:, None] * D + d[None, :], mask=(h < GQ)[:, None], other=0),
                 dtype, FP32_DOT)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        tok = t0 + t
        mask = tok < end
        rows = row0 + tok
        kcodes = _unpack(kc_ptr, rows, mask, D, KBITS)
        if KIVI:  # one scale and zero per channel for each run of KGROUP tokens
            if RUNS > 0:
                first = t0 + tl.arange(0, RUNS) * (BLOCK_T // RUNS)
                offs = (tl.load(runs_ptr + bh) + first // KGROUP)[:, None] * D + d[None, :]
                scale = tl.load(ks_ptr + offs, mask=(first < end)[:, None], other=0).to(tl.float32)
                zero = tl.load(kz_ptr + offs, mask=(first < end)[:, None], other=0).to(tl.float32)
                scale = tl.reshape(tl.broadcast_to(scale[:, None, :], (RUNS, BLOCK_T // RUNS, D)), (BLOCK_T, D))
                zero = tl.reshape(tl.broadcast_to(zero[:, None, :], (RUNS, BLOCK_T // RUNS, D)), (BLOCK_T, D))
            else:
                offs = tl.load(runs_ptr + rows, mask=mask, other=0).to(tl.int64)[:, None] * D + d[None, :]
                scale = tl.load(ks_ptr + offs, mask=mask[:, None], other=0).to(tl.float32)
                zero = tl.load(kz_ptr + offs, mask=mask[:, None], other=0).to(tl.float32)
            k = kcodes * scale + zero
        else:
            k = _dequant_tokens(kcodes, ks_ptr, kz_ptr, rows, mask, D, KGROUP, BLOCK_T)
        s = tl.dot(q, tl.trans(_operand(k, dtype, FP32_DOT))) * qk_scale
        s = tl.where(mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _dequant_tokens(_unpack(vc_ptr, rows, mask, D, VBITS), vs_ptr, vz_ptr, rows, mask, D, VGROUP, BLOCK_T)
        acc = acc * alpha[:, None] + tl.dot(_operand(p, dtype, FP32_DOT), _operand(v, dtype, FP32_DOT))
        m_i = m_new
    out = (bh * SPLITS + split) * BLOCK_H + h
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc)


@triton.jit
def _combine(m_ptr, l_ptr, acc_ptr, out_ptr, GQ: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
             SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
    """Merge one query head's per-split softmax partials; a head with no token gets zeros."""
    head = tl.program_id(0)  # flat (sequence, query head) = (sequence, KV head) * GQ + member of the group
    s = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, D)
    part = ((head // GQ) * SPLITS + s) * BLOCK_H + head % GQ
    m = tl.load(m_ptr + part, mask=s < SPLITS, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=s < SPLITS, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=(s < SPLITS)[:, None], other=0.0)
    top = tl.max(m, 0)
    w = tl.exp2(m - tl.where(top == float("-inf"), 0.0, top))
    total = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + head * D + d, out.to(out_ptr.dtype.element_ty))


@dataclass
class DecodePlan:
    """What launching over one segment needs besides its codes: offsets, the token split and scratch space.

    Built once per segment (its lengths decide it) and reusable for every query over that segment.
    """

    rows: Tensor  # (B*H,) first row of each (sequence, KV head)
    runs: Tensor  # (B*H,) first KIVI run of each head, or (N,) each token's run; unused for per-token keys
    lengths: Tensor  # (B*H,) tokens held
    shared_runs: int  # RUNS: KIVI runs per tile, 0 when each token's run is looked up
    chunk: int  # tokens per split
    splits: int
    block_h: int
    block_t: int
    partials: tuple[Tensor, Tensor, Tensor]  # running max, denominator and output of every split


def _format(codec: object, role: str) -> tuple[int, int]:
    if not isinstance(codec, (TokenGroups, ChannelGroups)) or (role == "values" and isinstance(codec, ChannelGroups)):
        raise ValueError(f"quant_decode reads integer {role} (KIVI or per-token groups), not {type(codec).__name__}")
    if isinstance(codec, TokenGroups) and codec.group & (codec.group - 1):
        raise ValueError(f"quant_decode needs {role} channel groups of a power of two, not {codec.group}")
    return codec.bits, codec.group


def plan_decode(segment: QuantizedSegment, q_heads: int, splits: int | None = None, block_t: int = 64) -> DecodePlan:
    """Offsets and the split over tokens for decoding ``q_heads`` query heads over ``segment``.

    ``splits`` programs share each (sequence, KV head)'s tokens; by default enough for eight programs per
    GPU multiprocessor, so memory latency stays hidden. ``block_t`` tokens per tile: a power of two of at
    least 64, because Triton 3.6 on an H100 computed wrong results with 16-token tiles (the interpreter
    did not); 64 was the fastest tile there.
    """
    if block_t < 64 or block_t & (block_t - 1):
        raise ValueError(f"block_t={block_t}: tiles must hold a power of two of at least 64 tokens")
    _format(segment.keys, "keys")
    _format(segment.values, "values")
    kv_heads = segment.lengths.shape[1]
    dim = segment.keys.codes.shape[-1] * 8 // segment.keys.bits  # type: ignore[union-attr]
    if q_heads % kv_heads:
        raise ValueError(f"quant_decode needs query heads ({q_heads}) a multiple of KV heads ({kv_heads})")
    lengths = segment.lengths.flatten()
    device = lengths.device
    rows = lengths.cumsum(0) - lengths
    shared_runs, runs = 0, rows  # per-token keys read no runs; any int tensor fills the slot
    if isinstance(segment.keys, ChannelGroups):
        group = segment.keys.group
        if segment.keys.sizes is None and group & (group - 1) == 0:  # whole power-of-two runs, tiles on their edges
            per_head = lengths // group
            runs, shared_runs = per_head.cumsum(0) - per_head, max(1, block_t // group)
        else:
            runs = segment.keys.token_runs().to(torch.int32)
    heads = lengths.numel()
    block_h = max(16, triton.next_power_of_2(q_heads // kv_heads))
    longest = segment.longest if heads else 0  # read once per segment (see QuantizedSegment.longest)
    tiles = max(1, triton.cdiv(longest, block_t))
    if splits is None:
        programs = 8 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        splits = triton.cdiv(programs, heads)
    chunk = triton.cdiv(tiles, max(1, min(splits, tiles))) * block_t
    splits = max(1, triton.cdiv(longest, chunk))
    m = torch.empty(heads * splits * block_h, device=device, dtype=torch.float32)
    partials = (m, torch.empty_like(m), torch.empty(heads * splits * block_h, dim, device=device, dtype=torch.float32))
    return DecodePlan(rows, runs, lengths, shared_runs, chunk, splits, block_h, block_t, partials)


def _launch_splits(query: Tensor, segment: QuantizedSegment, scaling: float, plan: DecodePlan | None,
                   num_warps: int) -> DecodePlan:
    """Run the split kernel: every split's running max (log2 units), denominator and output land in ``plan.partials``."""
    if query.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"quant_decode takes bf16 or fp16 queries, not {query.dtype}")
    batch, q_heads, dim = query.shape
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"quant_decode needs a power-of-two head_dim >= 16, got {dim}")
    plan = plan or plan_decode(segment, q_heads)
    kbits, kgroup = _format(segment.keys, "keys")
    vbits, vgroup = _format(segment.values, "values")
    group = q_heads // segment.lengths.shape[1]
    m, l, acc = plan.partials
    _decode_split[(plan.lengths.numel(), plan.splits)](
        query.contiguous(), segment.keys.codes, segment.keys.scale, segment.keys.zero,
        segment.values.codes, segment.values.scale, segment.values.zero, plan.rows, plan.runs, plan.lengths,
        m, l, acc, scaling * math.log2(math.e), plan.chunk,
        GQ=group, D=dim, KBITS=kbits, KGROUP=kgroup, KIVI=isinstance(segment.keys, ChannelGroups),
        RUNS=plan.shared_runs, VBITS=vbits, VGROUP=vgroup, BLOCK_H=plan.block_h, BLOCK_T=plan.block_t,
        SPLITS=plan.splits, FP32_DOT=not query.is_cuda, num_warps=num_warps,
    )
    return plan


def quant_decode(query: Tensor, segment: QuantizedSegment, scaling: float, plan: DecodePlan | None = None,
                 num_warps: int = 4) -> Tensor:
    """Attention (B, Hq, D) of one query (B, Hq, D) per sequence over the packed ``segment`` (GQA).

    Pass a :func:`plan_decode` plan to skip recomputing offsets (and a host sync) on every call.
    On CPU tensors (``TRITON_INTERPRET=1``, for tests) the products take float32 operands, because the
    interpreter's ``tl.dot`` mishandles bf16 and its casts to bf16 truncate: results differ from the GPU's
    only by the rounding of dequantized values and probabilities to the query dtype.
    """
    plan = _launch_splits(query, segment, scaling, plan, num_warps)
    batch, q_heads, dim = query.shape
    m, l, acc = plan.partials
    out = torch.empty_like(query)
    _combine[(batch * q_heads,)](m, l, acc, out, GQ=q_heads // segment.lengths.shape[1], D=dim,
                                 BLOCK_H=plan.block_h, SPLITS=plan.splits,
                                 SPLITS_P2=triton.next_power_of_2(plan.splits))
    return out


def quant_decode_partial(query: Tensor, segment: QuantizedSegment, scaling: float, plan: DecodePlan | None = None,
                         num_warps: int = 4) -> tuple[Tensor, Tensor]:
    """The same attention as a partial, (out (B, Hq, Dv), lse (B, Hq)) in float32 with a natural-log ``lse``
    (``-inf`` for a head holding no token): the contract of ``Segment.attend``, so the cache can merge it with the
    attention over its full-precision tail (:func:`kvslim.cache.segments.merge_partials`)."""
    plan = _launch_splits(query, segment, scaling, plan, num_warps)
    batch, q_heads, dim = query.shape
    kv_heads = segment.lengths.shape[1]
    group = q_heads // kv_heads
    m, l, acc = (t.view(batch, kv_heads, plan.splits, plan.block_h, -1)[:, :, :, :group] for t in plan.partials)
    m, l = m.squeeze(-1), l.squeeze(-1)  # (B, H, splits, G), log2 units
    top = m.amax(2, keepdim=True)
    weight = torch.exp2(m - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    total = (weight * l).sum(2)  # (B, H, G)
    out = (weight.unsqueeze(-1) * acc).sum(2) / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    lse = (top.squeeze(2) + torch.log2(total)) * math.log(2.0)
    return out.reshape(batch, q_heads, dim), lse.reshape(batch, q_heads)


def quant_decode_with_tail(query: Tensor, segment: QuantizedSegment, scaling: float, plan: DecodePlan | None,
                           tail_keys: Tensor, tail_values: Tensor, tail_valid: Tensor | None = None) -> Tensor:
    """Attention (B, Hq, Dv) in float32 of one query (B, Hq, D) per sequence over the packed ``segment`` and then a
    full-precision tail, (B, H, t, D) keys and values (``tail_valid`` (B, H, t) marks held columns; None: all).

    Why: a quantized HF cache decodes over its packed history plus the newest tokens. Merging two normalized partials
    (:func:`quant_decode_partial`, :func:`kvslim.cache.segments.partial_attention`, ``merge_partials``) costs ~40
    small ops per layer and step, which at batch 1 (launch-bound) made KIVI slower than the full cache. The tail's
    softmax state here is one more split in the kernel's own units (running max in log2 units, denominator, output),
    so one normalization serves the splits and the tail: about half the ops, the same attention. Every query row
    must see a tail column (a decoding step's own token), so the shared maximum is finite.
    """
    plan = _launch_splits(query, segment, scaling, plan, 4)
    batch, q_heads, dim = query.shape
    kv_heads = segment.lengths.shape[1]
    group = q_heads // kv_heads
    m, l, acc = (t.view(batch, kv_heads, plan.splits, plan.block_h, -1)[:, :, :, :group] for t in plan.partials)
    rows = query.reshape(batch, kv_heads, group, dim).float()  # query head h*G+g reads KV head h
    logits = rows @ tail_keys.float().transpose(-1, -2) * (scaling * math.log2(math.e))  # (B, H, G, t), log2 units
    if tail_valid is not None:
        logits = logits.masked_fill(~tail_valid[:, :, None, :], float("-inf"))
    tail_max = logits.amax(-1, keepdim=True)
    probs = torch.exp2(logits - tail_max)
    m = torch.cat([m.squeeze(-1), tail_max.transpose(-1, -2)], 2)  # (B, H, splits + 1, G)
    l = torch.cat([l.squeeze(-1), probs.sum(-1).unsqueeze(2)], 2)
    acc = torch.cat([acc, (probs @ tail_values.float()).unsqueeze(2)], 2)  # (B, H, splits + 1, G, Dv)
    weight = torch.exp2(m - m.amax(2, keepdim=True))
    out = (weight.unsqueeze(-1) * acc).sum(2) / (weight * l).sum(2).unsqueeze(-1)
    return out.reshape(batch, q_heads, -1)
