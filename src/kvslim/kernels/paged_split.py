"""Flash-decoding for the paged kernels: split each sequence's blocks over several programs, then merge.

With one program per (sequence, KV head), a step over few long sequences keeps a handful of
multiprocessors busy, each streaming its pages one block after another: the time is set by one
program's latency, not by the bytes. Splitting the blocks into chunks gives enough programs to fill
the GPU; each writes its unnormalised partial (running max, denominator, weighted sum) and a small
kernel merges the partials of every query head.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

PROGRAMS_PER_SM = 4  # enough programs in flight to hide memory latency
MIN_CHUNK = 8  # blocks per split of the widest sequence, at least: a split's fixed cost stays small next to its reads


def plan_splits(batch: int, kv_heads: int, max_blocks: int, device: torch.device, splits: int | None = None,
                pages_per_step: int = 1) -> int:
    """Programs sharing each (sequence, KV head)'s blocks, for sequences of at most ``max_blocks`` blocks (the
    block table's width); ``splits`` asks for that many (tests, tuning), by default enough to fill the GPU
    while each split still walks at least ``MIN_CHUNK`` loop steps of ``pages_per_step`` blocks.

    Each sequence spreads its own blocks evenly over the splits (the kernels divide in-kernel), so the
    launch depends on the table's width only, not on the lengths: a CUDA graph can replay it as the
    sequences grow, and programs past a short sequence's blocks just store an empty partial.
    """
    if splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        wanted = triton.cdiv(PROGRAMS_PER_SM * sms, max(1, batch * kv_heads))
        splits = min(wanted, triton.cdiv(max_blocks, MIN_CHUNK * pages_per_step))
    return max(1, splits)


def partials(batch: int, kv_heads: int, splits: int, block_g: int, head_dim: int, device: torch.device
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Scratch for every split's running max and denominator (B*H*splits*block_g,) and weighted sum (…, D)."""
    rows = batch * kv_heads * splits * block_g
    m = torch.empty(rows, device=device, dtype=torch.float32)
    return m, torch.empty_like(m), torch.empty(rows, head_dim, device=device, dtype=torch.float32)


@triton.jit
def store_partial(m_ptr, l_ptr, acc_ptr, m_i, l_i, acc, b, h, split, splits, H: tl.constexpr, BLOCK_G: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
    """Write one program's (m, l, acc) for its query group (``splits`` is a runtime value: no recompiling per count)."""
    rows = ((b * H + h) * splits + split) * BLOCK_G + tl.arange(0, BLOCK_G)
    tl.store(m_ptr + rows, m_i)
    tl.store(l_ptr + rows, l_i)
    tl.store(acc_ptr + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], acc)


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, splits, stride_ob, stride_oh, H: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr):
    """One query head: weight each split by exp(its max - the overall max); a head with no token gets zeros."""
    pid = tl.program_id(0)
    b = pid // (H * GROUP)
    q_head = pid % (H * GROUP)
    s = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, HEAD_DIM)
    rows = ((b * H + q_head // GROUP) * splits + s) * BLOCK_G + q_head % GROUP
    m = tl.load(m_ptr + rows, mask=s < splits, other=-1.0e30)
    l = tl.load(l_ptr + rows, mask=s < splits, other=0.0)
    acc = tl.load(acc_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=(s < splits)[:, None], other=0.0)
    w = tl.exp(m - tl.max(m, 0))
    out = tl.sum(w[:, None] * acc, 0) / tl.maximum(tl.sum(w * l, 0), 1.0e-30)
    tl.store(out_ptr + b * stride_ob + q_head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def combine(scratch: tuple[Tensor, Tensor, Tensor], out: Tensor, kv_heads: int, splits: int, block_g: int) -> Tensor:
    batch, q_heads, dim = out.shape
    _combine_kernel[(batch * q_heads,)](
        *scratch, out, splits, out.stride(0), out.stride(1), H=kv_heads, GROUP=q_heads // kv_heads, BLOCK_G=block_g,
        HEAD_DIM=dim, SPLITS_P2=triton.next_power_of_2(splits),
    )
    return out
