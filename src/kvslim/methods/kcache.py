"""KCache: keys stay on the device, values go to host memory; each step copies back the values it needs.

He & Wu, 2024, "Efficient LLM Inference with Kcache" (arXiv:2404.18057). Attention is sparse in
practice: after the exact scores q·K over all held tokens, only the top N tokens per KV head are
softmaxed and only their value rows are copied back to the device (:class:`KCacheSegment`).
Device memory holds the keys (about half of the cache) plus the first ``full_layers`` layers whole,
as the paper keeps its first layers untouched (their attention is broad, not sparse).

Decoded tokens: their values stay on the device (in the layer's tail segment, attended in full)
until ``recent`` of them have accumulated; then they move to the host together, one transfer per
``recent`` steps rather than one per token. So a step attends over the top N of the offloaded tokens
plus all of the at most ``recent - 1`` newest ones, and N (or ``fraction``) counts offloaded tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..cache.layer import LayerKV
from ..cache.offload import KCacheSegment, TopN
from ..cache.segments import DenseSegment
from ..shape import KVShape
from .base import Method, Observation
from .registry import register


@register
@dataclass
class KCache(Method):
    """Values of layers ``>= full_layers`` offloaded to the host; each step reads the top ``n`` (or ``fraction``)."""

    n: int | None = None
    fraction: float | None = None
    full_layers: int = 2
    recent: int = 64
    name = "kcache"
    summary = "keys on the device, values in host memory; top-N values copied back per step (offloading)"
    paper = "He & Wu 2024, Efficient LLM Inference with Kcache, arXiv:2404.18057"

    def validate(self) -> None:
        if (self.n is None) == (self.fraction is None):
            raise ValueError(f"{self.name}: give exactly one of n (tokens per KV head read per step) or fraction (in (0, 1])")
        if self.n is not None and self.n < 1:
            raise ValueError(f"{self.name}: n={self.n} must be a positive number of tokens per KV head")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"{self.name}: fraction={self.fraction} must be in (0, 1]; e.g. fraction=0.1 reads a tenth")
        if self.full_layers < 0:
            raise ValueError(f"{self.name}: full_layers={self.full_layers} must be >= 0")
        if self.recent < 1:
            raise ValueError(f"{self.name}: recent={self.recent} must be >= 1 (decoded tokens offloaded in batches of it)")

    def check_hybrid(self, parts: list[Method], position: int) -> None:
        if position != len(parts) - 1:
            raise ValueError(f"{self.name} re-stores the tokens it is given, so it must come last: e.g. 'snapkv+kcache'")

    def on_prefill(self, obs: Observation) -> None:
        if obs.layer_idx >= self.full_layers:
            self._offload(obs.layer)

    def on_decode(self, obs: Observation) -> None:
        layer = obs.layer
        if obs.layer_idx >= self.full_layers and sum(s.longest for s in layer.segments[1:]) >= self.recent:
            self._offload(layer)

    def _offload(self, layer: LayerKV) -> None:
        """Move every token of the layer into one offloaded segment, in time order."""
        first, *rest = layer.segments
        if not all(isinstance(s, DenseSegment) for s in rest) or not isinstance(first, (DenseSegment, KCacheSegment)):
            raise ValueError(f"{self.name} offloads plain key/value storage; it can follow eviction methods only")
        held = first if isinstance(first, KCacheSegment) else KCacheSegment.offload(first, TopN(self.n, self.fraction))
        for seg in rest:
            held = held.absorb(seg)  # type: ignore[arg-type]
        layer.replace([held])

    def storage_bytes(self, shape: KVShape, tokens: list[float]) -> int:
        """Device bytes (what ``kvslim calc`` shows): keys of offloaded layers, keys and values of the first ones.

        The values in host memory are not counted; right after prefill no decoded value is on the device.
        """
        per_tensor = shape.num_kv_heads * shape.head_dim * shape.element_bytes
        return int(round(sum(t * per_tensor * (2 if i < self.full_layers else 1) for i, t in enumerate(tokens))))
