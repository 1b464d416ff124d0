"""The decode step's small operations in plain PyTorch, in Hugging Face's op order (the engine's CPU path).

The Triton kernels in :mod:`kvslim.kernels.fused_ops` do each of these in one launch and round where
these round, so on a GPU they give the same values up to float32 summation order; these references are
what they are tested against and what the engine runs without a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face's RMSNorm, same op order (float32 statistics, weight applied in the input dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual stream after adding ``delta``, and its RMSNorm."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on (T, heads, D) with cos/sin (T, D), half-split layout as in Hugging Face."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None] + rotated * sin[:, None]


def silu_mul(gate_up: Tensor) -> Tensor:
    """SwiGLU's inner product ``silu(gate) * up`` for ``gate_up`` (T, 2I) holding gate then up."""
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up
