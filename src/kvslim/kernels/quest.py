"""Quest on the GPU: score every block of a sequence by its key bounds, then read only the selected blocks.

Same contracts as :func:`kvslim.kernels.quest_ref.quest_block_scores_ref` and
:func:`kvslim.kernels.quest_ref.paged_sparse_decode_ref` (the tested references). The scorer runs one program
per (sequence, KV head, chunk of blocks): it reads each block's key minimum and maximum (two vectors instead
of ``block_size`` keys, so 2 / block_size of the key bytes) and takes, for each query head of the group,
``sum_d max(q_d * min_d, q_d * max_d)``, keeping the largest. The sparse decode is the paged decode kernel
(:mod:`kvslim.kernels.paged_attention`) walking a per-head table of selected blocks, so only those blocks'
keys and values are read; its split/combine machinery (:mod:`kvslim.kernels.paged_split`) is reused as is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .paged_attention import paged_decode

BLOCKS_PER_PROGRAM = 16


@triton.jit
def _block_scores_kernel(
    q_ptr, min_ptr, max_ptr, tables_ptr, lens_ptr, out_ptr, num_blocks, sinks,
    stride_qb, stride_qh, stride_mn, stride_mh, stride_tb, stride_lb, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    length = tl.load(lens_ptr + b * stride_lb + h)
    held = (n < num_blocks) & (n * BLOCK_SIZE < length)
    block = tl.maximum(tl.load(tables_ptr + b * stride_tb + n, mask=n < num_blocks, other=0), 0).to(tl.int64)
    offs = block[:, None] * stride_mn + h * stride_mh + d[None, :]
    low = tl.load(min_ptr + offs, mask=held[:, None], other=0.0).to(tl.float32)
    high = tl.load(max_ptr + offs, mask=held[:, None], other=0.0).to(tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for g in tl.static_range(GROUP):  # the group's query heads, one at a time: (BLOCK_N, D) products only
        q = tl.load(q_ptr + b * stride_qb + (h * GROUP + g) * stride_qh + d).to(tl.float32)
        bound = tl.sum(tl.maximum(q[None, :] * low, q[None, :] * high), 1)
        best = tl.maximum(best, bound)
    newest = (length - 1) // BLOCK_SIZE
    best = tl.where((n < sinks) | (n == newest), float("inf"), best)  # always read (see force_pages)
    best = tl.where(held, best, float("-inf"))
    tl.store(out_ptr + b * stride_ob + h * stride_oh + n, best, mask=n < num_blocks)


def quest_block_scores(query: Tensor, kmin: Tensor, kmax: Tensor, block_tables: Tensor, lens: Tensor,
                       block_size: int, sinks: int) -> Tensor:
    """query (B, Hq, D); kmin/kmax (num_blocks, H, D); block_tables (B, M); lens (B, H) -> scores (B, H, M) float32."""
    batch, q_heads, dim = query.shape
    kv_heads = kmin.shape[1]
    if dim & (dim - 1):
        raise ValueError(f"the Triton Quest scorer needs a power-of-two head_dim, got {dim}")
    query, tables = query.contiguous(), block_tables.contiguous()
    width = tables.shape[1]
    out = torch.empty(batch, kv_heads, width, device=query.device, dtype=torch.float32)
    grid = (batch, kv_heads, triton.cdiv(width, BLOCKS_PER_PROGRAM))
    _block_scores_kernel[grid](
        query, kmin, kmax, tables, lens, out, width, sinks,
        query.stride(0), query.stride(1), kmin.stride(0), kmin.stride(1), tables.stride(0), lens.stride(0),
        out.stride(0), out.stride(1),
        GROUP=q_heads // kv_heads, BLOCK_N=BLOCKS_PER_PROGRAM, BLOCK_SIZE=block_size, HEAD_DIM=dim,
    )
    return out


@triton.jit
def _fold_kernel(min_ptr, max_ptr, slots_ptr, k_ptr, stride_mn, stride_mh, stride_sb, stride_kb, stride_kh,
                 BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    slot = tl.load(slots_ptr + b * stride_sb + h)
    offs = (slot // BLOCK_SIZE).to(tl.int64) * stride_mn + h * stride_mh + d
    # compared in float32 (exact for bf16/fp16 values, which Triton's interpreter cannot compare natively)
    key = tl.load(k_ptr + b * stride_kb + h * stride_kh + d).to(tl.float32)
    first = slot % BLOCK_SIZE == 0
    low = tl.load(min_ptr + offs).to(tl.float32)
    high = tl.load(max_ptr + offs).to(tl.float32)
    out = min_ptr.dtype.element_ty
    tl.store(min_ptr + offs, tl.where(first, key, tl.minimum(low, key)).to(out))
    tl.store(max_ptr + offs, tl.where(first, key, tl.maximum(high, key)).to(out))


def fold_block_extrema(kmin: Tensor, kmax: Tensor, slots: Tensor, keys: Tensor, block_size: int) -> None:
    """kmin/kmax (num_blocks, H, D) updated in place by keys (B, H, D) at flat slots (B, H): one launch per layer
    where the reference takes about ten small ones (the step is a graph of small kernels: each one counts)."""
    batch, heads, dim = keys.shape
    slots, keys = slots.contiguous(), keys.contiguous()
    _fold_kernel[(batch, heads)](kmin, kmax, slots, keys, kmin.stride(0), kmin.stride(1), slots.stride(0),
                                 keys.stride(0), keys.stride(1), BLOCK_SIZE=block_size, HEAD_DIM=dim)


def paged_sparse_decode(query: Tensor, k_pages: Tensor, v_pages: Tensor, block_tables: Tensor, selected: Tensor,
                        lens: Tensor, scale: float, splits: int | None = None) -> Tensor:
    """query (B, Hq, D); pages (N, bs, H, D); block_tables (B, M); selected (B, H, k); lens (B, H) -> (B, Hq, D)."""
    none = torch.zeros(query.shape[0], dtype=torch.int32, device=query.device)  # no sliding window
    return paged_decode(query, k_pages, v_pages, block_tables, lens, none, none, scale, splits=splits,
                        selected=selected)
