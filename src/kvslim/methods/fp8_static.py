"""vLLM's fp8 KV cache: ``fp8_e4m3`` and ``fp8_e5m2`` codes with static scales, and the ``--kv-cache-dtype`` flag.

Every key and value element is one fp8 byte; a sequence's keys (and its values) in each layer share one
float32 scale (``scale=per-tensor``) or one per KV head (``scale=per-head``), measured at its prefill as
``absmax / fp8 max`` (448 for e4m3, 57344 for e5m2) and kept for every token it decodes, a larger later
value clamped (see :mod:`kvslim.cache.fp8`, which also says how this differs from vLLM's
``calculate_kv_scales``). The scales cost 4 bytes per (layer, tensor[, head]) per sequence, so a token holds
``head_dim`` bytes per head for its key and as many for its value, against ``fp8``'s ``head_dim + 2`` (an fp16
scale with every token and head, which adapts to each token and never clamps). In a hybrid
(``snapkv(keep=0.25)+fp8_e5m2``) the scales are measured over the tokens the evictors keep.

:func:`with_kv_cache_dtype` is vLLM's flag: ``--kv-cache-dtype {auto,fp8,fp8_e4m3,fp8_e5m2}`` (``fp8`` means
``fp8_e4m3``, as in vLLM; ``auto`` keeps the model dtype) appends the format to a policy, so
``snapkv(keep=0.25)`` with ``--kv-cache-dtype fp8_e5m2`` is ``snapkv(keep=0.25)+fp8_e5m2``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..cache.fp8 import SCALE_BYTES, SCALE_GRANULARITIES, ScaledFloat8, static_scales
from ..cache.layer import LayerKV
from ..cache.quantized import QuantizedSegment
from ..shape import KVShape
from .base import Method, Observation
from .quantizers import Quantizer
from .registry import METHODS, _parse_term, _split_top, policy as build_policy, register

#: ``--kv-cache-dtype`` values, as vLLM spells them
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
_STATE = ("fp8_key_scale", "fp8_value_scale")  # per layer: (B, S) float32 scales of keys and values


@dataclass
class StaticFP8(Quantizer):
    """One fp8 byte per element; float32 scales per sequence and layer (and head) fixed at prefill."""

    scale: str = "per-tensor"
    residual: int = 0
    fmt: ClassVar[str] = ""
    paper = ("vLLM's --kv-cache-dtype fp8 KV cache with static scales (docs.vllm.ai, Quantized KV Cache); "
             "scales per sequence at prefill")

    def validate(self) -> None:
        super().validate()
        if self.scale not in SCALE_GRANULARITIES:
            raise ValueError(f"{self.name}: scale={self.scale!r} must be one of {', '.join(SCALE_GRANULARITIES)} "
                             "(one scale per layer's keys/values, or one per KV head)")

    @property
    def per_head(self) -> bool:
        return self.scale == "per-head"

    def on_prefill(self, obs: Observation) -> None:
        """The first prompt chunk fixes the sequence's scales (over the tokens held then); then pack as usual."""
        if _STATE[0] not in obs.layer.state:
            for name, x in zip(_STATE, (obs.keys, obs.values)):
                obs.layer.state[name] = static_scales(x, obs.valid, self.per_head, self.fmt)
        super().on_prefill(obs)

    def packed_segment(self, layer: LayerKV, keys: Tensor, values: Tensor, moving: Tensor) -> QuantizedSegment:
        batch, heads = moving.shape[:2]
        counts = moving.sum(-1)
        row_heads = torch.arange(batch * heads, device=moving.device).repeat_interleave(counts.flatten())
        key_scale, value_scale = (layer.state[name] for name in _STATE)
        return QuantizedSegment(ScaledFloat8.encode(keys[moving], row_heads, key_scale, heads, self.fmt),
                                ScaledFloat8.encode(values[moving], row_heads, value_scale, heads, self.fmt),
                                counts, keys.dtype)

    def packed_bytes(self, tokens: int, head_dim: int) -> int:
        return 2 * tokens * head_dim

    def storage_bytes(self, shape: KVShape, tokens: list[float]) -> int:
        """Codes for the tokens held, plus each layer's key and value scales."""
        scales = 2 * (shape.num_kv_heads if self.per_head else 1) * SCALE_BYTES
        return super().storage_bytes(shape, tokens) + len(tokens) * scales


@register
@dataclass
class FP8E4M3(StaticFP8):
    fmt = "fp8_e4m3"
    name = "fp8_e4m3"
    summary = ("vLLM's --kv-cache-dtype fp8 (e4m3: 3 mantissa bits, max 448), one byte per element; float32 "
               "scales per sequence and layer (scale=per-tensor) or per KV head (scale=per-head), fixed at prefill")


@register
@dataclass
class FP8E5M2(StaticFP8):
    fmt = "fp8_e5m2"
    name = "fp8_e5m2"
    summary = ("vLLM's --kv-cache-dtype fp8_e5m2 (2 mantissa bits, max 57344), one byte per element; float32 "
               "scales per sequence and layer (scale=per-tensor) or per KV head (scale=per-head), fixed at prefill")


def _storage_term(spec: str) -> str | None:
    """The name of a part of ``spec`` that already sets how the KV is stored (a quantizer, KCache, PQCache)."""
    from .kcache import KCache
    from .pqcache import PQCache

    for term in _split_top(spec, "+"):
        name = _parse_term(term)[0]
        if name in METHODS and issubclass(METHODS[name], (Quantizer, KCache, PQCache)):
            return name
    return None


def kv_cache_dtype_spec(spec: str, kv_cache_dtype: str = "auto", kv_scale: str | None = None) -> str:
    """``spec`` with vLLM's ``--kv-cache-dtype`` (and ``--kv-scale``) applied: the fp8 format appended as its last
    part (``full`` becomes the format alone); ``auto`` leaves ``spec`` as it is."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)} "
                         "(vLLM's names: fp8 is fp8_e4m3; auto keeps the model dtype)")
    if kv_scale is not None and kv_scale not in SCALE_GRANULARITIES:
        raise ValueError(f"--kv-scale {kv_scale!r} is not one of {', '.join(SCALE_GRANULARITIES)}")
    if kv_cache_dtype == "auto":
        if kv_scale is not None:
            raise ValueError("--kv-scale sets the scales of fp8 KV: give it with --kv-cache-dtype fp8_e4m3 or fp8_e5m2")
        return spec
    fmt = "fp8_e4m3" if kv_cache_dtype == "fp8" else kv_cache_dtype
    stored = _storage_term(spec)
    if stored is not None:
        raise ValueError(f"policy {spec} already stores the KV as {stored}: drop --kv-cache-dtype {kv_cache_dtype}, "
                         f"or replace {stored} in the policy with {fmt}")
    part = f"{fmt}(scale={kv_scale})" if kv_scale is not None else fmt
    terms = [t for t in _split_top(spec, "+") if _parse_term(t)[0] != "full"]
    return "+".join([*terms, part])


def with_kv_cache_dtype(policy: "str | Method", kv_cache_dtype: str = "auto",
                        kv_scale: str | None = None) -> "str | Method":
    """:func:`kv_cache_dtype_spec` for a spec or a built method (which is rebuilt from its spec)."""
    if isinstance(policy, str):
        return kv_cache_dtype_spec(policy, kv_cache_dtype, kv_scale)
    if kv_cache_dtype == "auto" and kv_scale is None:
        return policy
    return build_policy(kv_cache_dtype_spec(policy.spec, kv_cache_dtype, kv_scale))

