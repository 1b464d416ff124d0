"""Quantized KV pages: the codes of kvslim's quantizers (kivi2/kivi4, int8/int4, fp8, fp8_e4m3/fp8_e5m2) laid out
in fixed blocks.

A block holds ``block_size`` token slots of every KV head, like a model-dtype page, but as codes plus
fp16 scales (and zero points), so the same tokens take fewer bytes. The codes are exactly what
:mod:`kvslim.cache.quantized` makes (its encoders are called, its packing is used), so a token dequantizes
to the same number in the engine as in ``kvslim.Cache``. Per tensor (keys or values), one of:

* ``token``: per-token groups of ``group`` channels, one scale and zero per group (int8/int4, KIVI values);
* ``channel``: KIVI keys, one scale and zero per channel for a run of ``group`` consecutive slots of one
  head. A run never straddles two blocks (``block_size`` must be a multiple of ``group``), so a run's
  scales live in the block of its slots: ``(block_size // group, heads, head_dim)`` per block;
* ``fp8``: e4m3 codes (stored as bytes) with one fp16 scale per token and head.
* ``fp8_e4m3`` / ``fp8_e5m2`` (vLLM's ``--kv-cache-dtype``): fp8 codes (stored as bytes) under a scale fixed
  per sequence at its prefill (:mod:`kvslim.cache.fp8`). Each block keeps its sequence's float32 scale, one
  (``per_head``: one per KV head) per block: ``(1, 1 or heads)``. A block is then self-contained, so a
  shared prefix block or one brought back from a KV tier dequantizes with the scale it was written with.

Every tensor has a leading layer dimension; a flat slot is ``block * block_size + offset`` as for the
model-dtype pool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache.fp8 import FP8_FORMATS
from ..cache.quantized import ChannelGroups, Codec, Float8, TokenGroups, unpack


@dataclass(frozen=True)
class Codes:
    """How one tensor (keys or values) is coded: ``kind`` token/channel/fp8/fp8_e4m3/fp8_e5m2, code ``bits``, ``group``;
    ``per_head``: static fp8 scales per KV head rather than per tensor (see module doc)."""

    kind: str
    bits: int
    group: int
    per_head: bool = False

    @classmethod
    def of(cls, codec: Codec, head_dim: int) -> "Codes":
        if isinstance(codec, TokenGroups):
            return cls("token", codec.bits, codec.group)
        if isinstance(codec, ChannelGroups):
            return cls("channel", codec.bits, codec.group)
        if isinstance(codec, Float8):
            return cls("fp8", 8, head_dim)
        raise ValueError(f"paged pages cannot hold {type(codec).__name__} codes (only integer groups, KIVI runs, fp8)")

    @classmethod
    def static_fp8(cls, fmt: str, per_head: bool, head_dim: int) -> "Codes":
        """vLLM's fp8 formats with static scales (``fmt`` fp8_e4m3 or fp8_e5m2)."""
        return cls(fmt, 8, head_dim, per_head)

    @property
    def static(self) -> bool:
        """Whether scales are static (one per block, the sequence's), not per token or group."""
        return self.kind in FP8_FORMATS

    @property
    def has_zero(self) -> bool:
        return self.kind in ("token", "channel")

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32 if self.static else torch.float16

    def shapes(self, block_size: int, heads: int, head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-block shapes of the codes (bytes) and of the scales (fp16, static fp8's float32; zero points alike)."""
        codes = (block_size, heads, head_dim * self.bits // 8)
        if self.kind == "token":
            return codes, (block_size, heads, head_dim // self.group)
        if self.kind == "channel":
            return codes, (block_size // self.group, heads, head_dim)
        if self.static:
            return codes, (1, heads if self.per_head else 1)
        return codes, (block_size, heads, 1)

    def block_bytes(self, block_size: int, heads: int, head_dim: int) -> int:
        codes, scales = self.shapes(block_size, heads, head_dim)
        scale_bytes = (2 if self.has_zero else 1) * torch.empty((), dtype=self.scale_dtype).element_size()
        return int(torch.Size(codes).numel()) + scale_bytes * int(torch.Size(scales).numel())


@dataclass
class CodePages:
    """One tensor's codes, scales and zero points for every layer: ``(L, num_blocks, *per-block shape)``."""

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    spec: Codes

    @classmethod
    def allocate(cls, spec: Codes, layers: int, num_blocks: int, block_size: int, heads: int, head_dim: int,
                 device: torch.device) -> "CodePages":
        codes, scales = spec.shapes(block_size, heads, head_dim)
        make = lambda shape, dtype: torch.zeros((layers, num_blocks, *shape), dtype=dtype, device=device)  # noqa: E731
        return cls(make(codes, torch.uint8), make(scales, spec.scale_dtype),
                   make(scales, spec.scale_dtype) if spec.has_zero else None, spec)

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.codes, self.scale, self.zero) if t is not None]

    def layer(self, index: int) -> "CodePages":
        return CodePages(self.codes[index], self.scale[index], None if self.zero is None else self.zero[index], self.spec)

    def write(self, layers: Tensor | int, slots: Tensor, heads: Tensor, codec: Codec) -> None:
        """Store ``codec``'s rows at flat ``slots`` of ``heads`` (of ``layers``), one entry per row.

        KIVI runs: rows come in whole runs, each of ``group`` consecutive slots of one head starting at a
        multiple of ``group``; the run's scales go to the run that first slot opens.
        """
        layer_count = self.codes.shape[0]
        flat = lambda t: t.view(layer_count, -1, *t.shape[-2:])  # noqa: E731  (L, slots or runs, H, X)
        codes = codec.codes.view(torch.uint8) if isinstance(codec, Float8) else codec.codes
        flat(self.codes)[layers, slots, heads] = codes
        if self.spec.kind == "channel":
            group = self.spec.group
            first = slice(None, None, group)
            run_layers = layers if isinstance(layers, int) else layers[first]
            flat(self.scale)[run_layers, slots[first] // group, heads[first]] = codec.scale
            flat(self.zero)[run_layers, slots[first] // group, heads[first]] = codec.zero  # type: ignore[arg-type]
            return
        flat(self.scale)[layers, slots, heads] = codec.scale
        if self.zero is not None:
            flat(self.zero)[layers, slots, heads] = codec.zero  # type: ignore[union-attr]

    def write_static(self, layers: Tensor | int, slots: Tensor, heads: Tensor, codes: Tensor,
                     row_scale: Tensor) -> None:
        """Static fp8: store (N, D) fp8 ``codes`` at flat ``slots`` of ``heads`` (of ``layers``), and each row's (N,)
        scale (its sequence's) as the scale of the row's block."""
        layer_count, block_size = self.codes.shape[0], self.codes.shape[2]
        self.codes.view(layer_count, -1, *self.codes.shape[-2:])[layers, slots, heads] = codes.view(torch.uint8)
        scale_heads = heads if self.spec.per_head else torch.zeros_like(heads)
        self.scale.view(layer_count, -1, self.scale.shape[-1])[layers, slots // block_size, scale_heads] = row_scale

    def dequantize(self, blocks: Tensor) -> Tensor:
        """Float32 ``(*blocks.shape, block_size, H, D)`` of one layer's pages (call on :meth:`layer`), as the codecs
        decode them."""
        spec = self.spec
        if spec.kind == "fp8":
            return self.codes[blocks].view(torch.float8_e4m3fn).float() * self.scale[blocks].float()
        if spec.static:  # one scale per block (and head): (..., 1, S) against (..., block_size, H, D)
            return self.codes[blocks].view(FP8_FORMATS[spec.kind][0]).float() * self.scale[blocks].unsqueeze(-1)
        codes = unpack(self.codes[blocks], spec.bits).float()
        if spec.kind == "token":
            grouped = codes.unflatten(-1, (-1, spec.group))
            return (grouped * self.scale[blocks].float().unsqueeze(-1) + self.zero[blocks].float().unsqueeze(-1)).flatten(-2)
        scale = self.scale[blocks].float().repeat_interleave(spec.group, -3)
        return codes * scale + self.zero[blocks].float().repeat_interleave(spec.group, -3)  # type: ignore[index]


@dataclass
class QuantPages:
    """Keys' and values' code pages of every layer."""

    keys: CodePages
    values: CodePages

    def layer(self, index: int) -> "QuantPages":
        return QuantPages(self.keys.layer(index), self.values.layer(index))

    def tensors(self) -> list[Tensor]:
        return self.keys.tensors() + self.values.tensors()
