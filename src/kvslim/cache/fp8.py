"""FP8 KV storage with static scales, as vLLM's ``--kv-cache-dtype fp8_e4m3`` / ``fp8_e5m2``.

Each key and value element is one fp8 byte (``torch.float8_e4m3fn``: finite max 448, 3 mantissa bits;
``torch.float8_e5m2``: max 57344, 2 mantissa bits but a wider range). A sequence's keys (and, separately,
its values) in one layer share a float32 scale: one for the whole tensor (``per-tensor``) or one per KV head
(``per-head``). The scale is ``absmax / fp8 max`` over the tokens the sequence holds at its prefill, and is
kept for every token it decodes later: a later value beyond the prompt's range is clamped to the format's
largest finite number (as vLLM's static scales clamp); a prompt fed in chunks is measured on its first
chunk. vLLM's ``calculate_kv_scales`` instead measures the first batch the engine runs and keeps those
scales for every later request; kvslim measures each sequence at its own prefill, so one prompt's range
never limits another's.

A token dequantizes to ``code * scale`` in float32 (then the model dtype), the same number in
``kvslim.Cache`` (:class:`ScaledFloat8`) and in the engine's pages (:mod:`kvslim.kernels.paged_quant`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .quantized import interleave_rows, merge_order

#: vLLM's names for the formats -> (torch dtype, largest finite value)
FP8_FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "fp8_e4m3": (torch.float8_e4m3fn, 448.0),
    "fp8_e5m2": (torch.float8_e5m2, 57344.0),
}
#: scale granularities: one scale per layer's keys (values) of a sequence, or one per KV head
SCALE_GRANULARITIES = ("per-tensor", "per-head")
SCALE_BYTES = 4  # float32 scales, as vLLM's


def static_scales(x: Tensor, valid: Tensor, per_head: bool, fmt: str) -> Tensor:
    """(B, H or 1) float32 scales of (B, H, T, D) ``x`` over its ``valid`` (B, H, T) tokens: absmax / fp8 max.

    A tensor of zeros (or no tokens) gets scale 1, so its codes are zero and later tokens still code."""
    top = FP8_FORMATS[fmt][1]
    absmax = x.float().abs().amax(-1).masked_fill(~valid, 0.0)  # (B, H, T)
    absmax = absmax.amax(-1) if per_head else absmax.flatten(1).amax(-1, keepdim=True)
    scale = absmax / top
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def row_scales(scale: Tensor, heads: int, row_heads: Tensor) -> Tensor:
    """(N,) the scale of each row of (B, S) ``scale`` (S = 1 or ``heads``), from its flat (sequence, head) index."""
    per_scale = heads // scale.shape[-1]  # heads sharing one scale: all of them (per-tensor) or 1
    return scale.flatten()[row_heads // per_scale]


def to_fp8(rows: Tensor, row_scale: Tensor, fmt: str) -> Tensor:
    """(N, D) rows divided by their (N,) scales, clamped to the format's finite range, as (N, D) fp8 codes."""
    dtype, top = FP8_FORMATS[fmt]
    return (rows.float() / row_scale[:, None]).clamp_(-top, top).to(dtype)


class ScaledFloat8:
    """A :class:`~kvslim.cache.quantized.Codec`: one fp8 byte per element, scales per (sequence[, head]).

    ``scale`` is (B, S) with S = 1 (per-tensor) or S = H (per-head); rows are stored in (sequence, head,
    token) order, so a row's scale is found from its flat (sequence, head) index, which the segment passes
    to :meth:`decode`. Every codec of one layer holds the same scales, so :meth:`take` and :meth:`concat`
    only move codes.
    """

    def __init__(self, codes: Tensor, scale: Tensor, heads: int, fmt: str):
        self.codes, self.scale, self.heads, self.fmt = codes, scale, heads, fmt
        self.format = (fmt, scale.shape[-1] == heads)

    @classmethod
    def encode(cls, rows: Tensor, row_heads: Tensor, scale: Tensor, heads: int, fmt: str) -> "ScaledFloat8":
        """Code (N, D) rows whose flat (sequence, head) indices are ``row_heads`` under (B, S) ``scale``."""
        return cls(to_fp8(rows, row_scales(scale, heads, row_heads), fmt), scale, heads, fmt)

    def row_scale(self, row_heads: Tensor) -> Tensor:
        """(N,) the scale of each row, from its flat (sequence, head) index."""
        return row_scales(self.scale, self.heads, row_heads)

    def decode(self, heads: Tensor | None = None) -> Tensor:
        if heads is None:
            raise ValueError("fp8 codes with per-sequence scales decode with each row's (sequence, head) index")
        return self.codes.float() * self.row_scale(heads)[:, None]

    def take(self, rows: Tensor) -> "ScaledFloat8":
        return ScaledFloat8(self.codes[rows], self.scale, self.heads, self.fmt)

    def concat(self, newer: "ScaledFloat8", heads: Tensor, newer_heads: Tensor) -> "ScaledFloat8":
        order = merge_order(heads, newer_heads)
        return ScaledFloat8(torch.cat([self.codes, newer.codes])[order], self.scale, self.heads, self.fmt)

    def interleave(self, newer: "ScaledFloat8", rows: int) -> "ScaledFloat8":
        return ScaledFloat8(interleave_rows(self.codes, newer.codes, rows), self.scale, self.heads, self.fmt)

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()
