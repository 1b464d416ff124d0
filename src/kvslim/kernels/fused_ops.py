"""Triton kernels for the decode step's small operations: one launch each instead of five to ten.

Why: at decode batch sizes a Llama layer's norms, RoPE and SwiGLU product are a few KB of work each, but
in PyTorch they are ~40 kernels per layer (casts, powers, means, concatenations, negations); inside a CUDA
graph each still costs its launch gap, which on an H200 added up to 2.2-2.8 ms of an 8B model's 9-22 ms
decode step (benchmarks/results/engine_speed_h200/decode_profile_before.json). Each kernel here rounds to
the activation dtype exactly where the reference in :mod:`kvslim.kernels.fused_ops_ref` (Hugging Face's op
order) does, so only float32 summation order differs.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, norm_ptr, n, eps, stride_x, stride_d, stride_o,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(out_ptr + row * stride_o + cols, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, 0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(norm_ptr + row * stride_o + cols, (w.to(tl.float32) * h.to(x.dtype).to(tl.float32)).to(x.dtype), mask=mask)


def add_rms_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(T, N) rows: ``x + delta`` (x itself when ``delta`` is None) and its RMSNorm, in one launch."""
    rows, n = x.shape
    out = x if delta is None else x.new_empty(x.shape)
    norm = x.new_empty(x.shape)
    d = x if delta is None else delta
    _add_rms_norm_kernel[(rows,)](x, d, weight, out, norm, n, eps, x.stride(0), d.stride(0), out.stride(0),
                                  HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(n))
    return out, norm


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return add_rms_norm(x, None, weight, eps)[1]


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, heads, stride_xt, stride_xh, stride_c, HALF: tl.constexpr):
    """One (token, head): x1' = x1*c1 - x2*s1, x2' = x2*c2 + x1*s2, each product rounded as torch does."""
    t = tl.program_id(0) // heads
    h = tl.program_id(0) % heads
    d = tl.arange(0, HALF)
    base = x_ptr + t * stride_xt + h * stride_xh
    x1, x2 = tl.load(base + d), tl.load(base + HALF + d)
    c1, c2 = tl.load(cos_ptr + t * stride_c + d), tl.load(cos_ptr + t * stride_c + HALF + d)
    s1, s2 = tl.load(sin_ptr + t * stride_c + d), tl.load(sin_ptr + t * stride_c + HALF + d)
    dt = x1.dtype
    f = tl.float32
    a1 = (x1.to(f) * c1.to(f)).to(dt).to(f) + (-(x2.to(f)) * s1.to(f)).to(dt).to(f)
    a2 = (x2.to(f) * c2.to(f)).to(dt).to(f) + (x1.to(f) * s2.to(f)).to(dt).to(f)
    tl.store(base + d, a1.to(dt))
    tl.store(base + HALF + d, a2.to(dt))


def rotate_(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in place on (T, heads, D) (rows may be views into a wider buffer: the last dim must be contiguous)."""
    tokens, heads, dim = x.shape
    if dim & (dim - 1) or x.stride(-1) != 1:
        raise ValueError(f"rotate_ needs a contiguous power-of-two head_dim, got {dim} (stride {x.stride(-1)})")
    _rope_kernel[(tokens * heads,)](x, cos, sin, heads, x.stride(0), x.stride(1), cos.stride(0), HALF=dim // 2)
    return x


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_mul(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` for (T, 2I) rows holding gate then up, in one launch."""
    rows, width = gate_up.shape
    n = width // 2
    out = gate_up.new_empty(rows, n)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), out.stride(0), BLOCK=block)
    return out
