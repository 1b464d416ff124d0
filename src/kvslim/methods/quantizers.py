"""Quantized KV storage: KIVI (2- and 4-bit), int8/int4 per-token groups and fp8.

After each prompt chunk and each decoding step, a quantizer moves the layer's oldest full-precision
tokens into one packed :class:`~kvslim.cache.quantized.QuantizedSegment` (merged with the one it already
holds), in whole blocks, leaving the newest ``residual`` tokens (plus an unfinished block) in the model's
dtype. The layer's dense layout keeps time order: packed tokens first, the full-precision tail last, where
the cache appends new tokens.

* ``kivi2`` / ``kivi4`` (Liu et al. 2024, arXiv:2402.02750): keys per channel over runs of ``group`` tokens,
  values per token over groups of ``group`` channels (at most ``head_dim``). Keys need whole runs of
  ``group`` tokens, and the paper keeps the newest tokens exact, so up to ``residual + group - 1`` tokens
  stay full precision (``residual=128``, ``group=32`` as in the paper).
* ``int8`` / ``int4``: keys and values per token over groups of ``group`` channels, asymmetric. A per-token
  format needs no run to fill, so ``residual`` defaults to 0: every token is packed at once. ``int8`` takes
  one group per head (``group=128``): 8 bits already resolve a whole head, and 128-channel groups keep its
  scales at 3% of the codes; ``int4`` needs finer groups (``group=32``).
* ``fp8``: e4m3 codes with one fp16 scale per token and head (a scale measured for every token, so nothing
  is ever clamped; 2 bytes of scale per ``head_dim`` bytes of codes). vLLM's ``--kv-cache-dtype`` formats with one
  static scale per sequence, ``fp8_e4m3`` and ``fp8_e5m2``, are in :mod:`kvslim.methods.fp8_static`.

In a hybrid (``snapkv+kivi2``, ``h2o+int8``, ``streaming+kivi4``) the quantizer comes last and packs what the
evictors keep; evicting a packed token only drops its codes (see ``QuantizedSegment.select``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from ..cache.buffers import GrowingSegment, StaticSegment
from ..cache.layer import LayerKV
from ..cache.quantized import ChannelGroups, Encoder, Float8, QuantizedSegment, TokenGroups
from ..cache.segments import DenseSegment, Segment
from ..shape import KVShape
from .base import Method, Observation
from .registry import register

SCALE_BYTES = 2  # fp16 scales and zero points


def _channel_group(name: str, group: int, head_dim: int) -> int:
    """Channels per group: ``group``, capped at ``head_dim`` (one group per head), dividing ``head_dim``."""
    channels = min(group, head_dim)
    if head_dim % channels:
        raise ValueError(f"{name}: group={group} must divide head_dim={head_dim} (or be >= it)")
    return channels


def _layout_valid(segments: list[Segment]) -> Tensor:
    """(B, H, T) the valid mask of the dense layout these segments make, without dequantizing anything."""
    masks = [torch.arange(s.longest, device=s.lengths.device) < s.lengths.unsqueeze(-1) for s in segments]
    return torch.cat(masks, -1)


def _relayout_state(layer: LayerKV, segments: list[Segment]) -> None:
    """Carry per-token method state over to the layout of ``segments``.

    Evictors chained before a quantizer keep per-token state as float tensors (B, H, T) over the dense
    layout (H2O's accumulated attention). Moving tokens between segments keeps their time order but can
    move padding when heads hold different counts, so each value follows its token.
    """
    if not any(isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 3
               for value in layer.state.values()):
        return  # no per-token state (a quantizer alone): nothing to move, no layout to compare (a host sync)
    old, new = _layout_valid(layer.segments), _layout_valid(segments)
    if old.shape == new.shape and bool((old == new).all()):
        return
    for key, value in layer.state.items():
        if isinstance(value, Tensor) and value.is_floating_point() and value.shape == old.shape:
            moved = value.new_zeros(new.shape)
            moved[new] = value[old]
            layer.state[key] = moved


class Quantizer(Method):
    """Shared by every format: pack old full-precision tokens in whole blocks; the newest ``residual`` stay."""

    residual: int

    def validate(self) -> None:
        if self.residual < 0:
            raise ValueError(f"{self.name}: residual={self.residual} must be >= 0 (newest tokens kept full precision)")

    def block(self) -> int:
        """Tokens per (sequence, head) that are packed together."""
        return 1

    def encoders(self, key_dim: int, value_dim: int) -> tuple[Encoder, Encoder]:
        raise NotImplementedError

    def packed_bytes(self, tokens: int, head_dim: int) -> int:
        """Bytes one KV head holds for ``tokens`` packed tokens (a multiple of :meth:`block`): keys and values."""
        raise NotImplementedError

    def packed_tokens(self, tokens: float) -> int:
        """Tokens packed out of ``tokens`` held, once every whole block older than the residual has moved."""
        return max(0, math.floor(tokens) - self.residual) // self.block() * self.block()

    def check_hybrid(self, parts: list[Method], position: int) -> None:
        if position != len(parts) - 1:
            others = "+".join(p.name for p in parts if not isinstance(p, Quantizer)) or "snapkv"
            raise ValueError(
                f"{'+'.join(p.name for p in parts)}: {self.name} packs what the other parts keep, so a hybrid "
                f"takes one quantizer and it comes last: write e.g. '{others}+{self.name}'"
            )

    def on_prefill(self, obs: Observation) -> None:
        self.store(obs.layer)

    def on_decode(self, obs: Observation) -> None:
        self.store(obs.layer)

    def store(self, layer: LayerKV) -> None:
        """Move every whole block of full-precision tokens older than the newest ``residual`` into the packed one."""
        segments = list(layer.segments)
        cut = len(segments)
        while cut and isinstance(segments[cut - 1], DenseSegment):
            cut -= 1
        if cut == len(segments):
            return
        tail = segments[-1]
        if cut == len(segments) - 1 and (isinstance(tail, GrowingSegment) or
                                         (isinstance(tail, StaticSegment) and tail.filled is not None)):
            self._store_tail(layer, segments[:cut], segments[-1])
            return
        keys, values, valid = (torch.cat(parts, 2) for parts in zip(*(s.dense() for s in segments[cut:])))
        held = valid.sum(-1)
        move = (held - self.residual).clamp(min=0) // self.block() * self.block()
        if not bool(move.any()):
            return
        moving = valid & (valid.long().cumsum(-1) <= move.unsqueeze(-1))
        packed = self.packed_segment(layer, keys, values, moving)
        head = segments[:cut]
        if head and isinstance(head[-1], QuantizedSegment) and head[-1].format == packed.format:
            packed = head.pop().concat(packed)
        rest = valid & ~moving
        stored = head + [packed] + ([DenseSegment.from_padded(keys, values, rest)] if bool(rest.any()) else [])
        _relayout_state(layer, stored)
        layer.replace(stored)

    def packed_segment(self, layer: LayerKV, keys: Tensor, values: Tensor, moving: Tensor) -> QuantizedSegment:
        """The (B,H,T,D) keys/values where ``moving`` (B,H,T) is True, coded in this format."""
        return QuantizedSegment.from_padded(keys, values, moving, *self.encoders(keys.shape[-1], values.shape[-1]))

    def _store_tail(self, layer: LayerKV, head: list[Segment], tail: GrowingSegment | StaticSegment) -> None:
        """:meth:`store` for a layer whose full-precision tokens are one buffered tail, every row holding ``filled``.

        Why: this runs after every decoding step, and on most steps nothing is due; the count is a Python int here,
        so those steps cost no host sync and no copy. When a block is due, the oldest ``move`` columns are packed
        and the rest stay in a new tail; a static one (``kvslim.Cache(max_length=...)``) has fixed room for the
        ``residual + block`` tokens that accumulate between packings.
        """
        filled = int(tail.filled)  # type: ignore[arg-type]  # known: the caller checked
        move = max(0, filled - self.residual) // self.block() * self.block()
        if move == 0:
            return
        keys, values = (x[:, :, :filled] for x in tail.dense()[:2])  # a static tail's buffers are wider
        moving = torch.ones(keys.shape[:2] + (move,), dtype=torch.bool, device=keys.device)
        packed = self.packed_segment(layer, keys[:, :, :move], values[:, :, :move], moving)
        packed.per_row = move  # every row packed ``move`` tokens: merging with the packed head needs no sort
        if head and isinstance(head[-1], QuantizedSegment) and head[-1].format == packed.format:
            packed = head.pop().concat(packed)
        rest_k, rest_v = keys[:, :, move:], values[:, :, move:]
        rest = [] if move == filled else [GrowingSegment.holding(rest_k, rest_v) if isinstance(tail, GrowingSegment)
                                          else StaticSegment.holding(rest_k, rest_v, None, self.residual + self.block())]
        stored = head + [packed] + rest
        _relayout_state(layer, stored)
        layer.replace(stored)

    def storage_bytes(self, shape: KVShape, tokens: list[float]) -> int:
        dense = 2 * shape.head_dim * shape.element_bytes
        total = 0.0
        for held in tokens:
            packed = self.packed_tokens(held)
            total += self.packed_bytes(packed, shape.head_dim) + (held - packed) * dense
        return int(round(total * shape.num_kv_heads))


@dataclass
class KIVI(Quantizer):
    """Keys per channel over runs of ``group`` tokens, values per token over ``group`` channels; ``residual`` exact."""

    group: int = 32
    residual: int = 128
    bits: ClassVar[int] = 2
    paper = "Liu et al. 2024, KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache, arXiv:2402.02750"

    def validate(self) -> None:
        super().validate()
        if self.group < 1:
            raise ValueError(f"{self.name}: group={self.group} must be >= 1 (tokens per key run, value channels)")

    def block(self) -> int:
        return self.group

    def encoders(self, key_dim: int, value_dim: int) -> tuple[Encoder, Encoder]:
        channels = _channel_group(self.name, self.group, value_dim)
        return (partial(ChannelGroups.encode, bits=self.bits, group=self.group),
                partial(TokenGroups.encode, bits=self.bits, group=channels))

    def packed_bytes(self, tokens: int, head_dim: int) -> int:
        codes = tokens * head_dim * self.bits // 8
        key_scales = tokens // self.group * head_dim * 2 * SCALE_BYTES
        value_scales = tokens * head_dim // _channel_group(self.name, self.group, head_dim) * 2 * SCALE_BYTES
        return 2 * codes + key_scales + value_scales


@register
@dataclass
class KIVI2(KIVI):
    name = "kivi2"
    summary = "2-bit KV: keys per channel, values per token (KIVI), newest tokens full precision"


@register
@dataclass
class KIVI4(KIVI):
    bits = 4
    name = "kivi4"
    summary = "4-bit KV: keys per channel, values per token (KIVI), newest tokens full precision"


@dataclass
class IntQuantizer(Quantizer):
    """Keys and values per token over groups of ``group`` channels, asymmetric; the newest ``residual`` exact."""

    group: int = 32
    residual: int = 0
    bits: ClassVar[int] = 8
    paper = "per-token group quantization of the KV cache, as in FlexGen (Sheng et al. 2023, arXiv:2303.06865)"

    def validate(self) -> None:
        super().validate()
        if self.group < 1:
            raise ValueError(f"{self.name}: group={self.group} must be >= 1 (channels sharing a scale)")

    def encoders(self, key_dim: int, value_dim: int) -> tuple[Encoder, Encoder]:
        return (partial(TokenGroups.encode, bits=self.bits, group=_channel_group(self.name, self.group, key_dim)),
                partial(TokenGroups.encode, bits=self.bits, group=_channel_group(self.name, self.group, value_dim)))

    def packed_bytes(self, tokens: int, head_dim: int) -> int:
        groups = head_dim // _channel_group(self.name, self.group, head_dim)
        return 2 * tokens * (head_dim * self.bits // 8 + groups * 2 * SCALE_BYTES)


@register
@dataclass
class Int8(IntQuantizer):
    group: int = 128
    name = "int8"
    summary = "8-bit KV per token (asymmetric, one scale per head by default)"


@register
@dataclass
class Int4(IntQuantizer):
    bits = 4
    name = "int4"
    summary = "4-bit KV per token, groups of 32 channels (asymmetric)"


@register
@dataclass
class FP8(Quantizer):
    """e4m3 keys and values, one fp16 scale per token and head; the newest ``residual`` tokens exact."""

    residual: int = 0
    name = "fp8"
    summary = "fp8 (e4m3) KV with one fp16 scale per token and head (not vLLM's fp8: see fp8_e4m3)"
    paper = "vLLM's fp8 (e4m3) KV cache with scales (docs.vllm.ai, Quantized KV Cache)"

    def encoders(self, key_dim: int, value_dim: int) -> tuple[Encoder, Encoder]:
        return Float8.encode, Float8.encode

    def packed_bytes(self, tokens: int, head_dim: int) -> int:
        return 2 * tokens * (head_dim + SCALE_BYTES)
