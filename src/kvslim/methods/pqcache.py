"""PQCache: product-quantized keys pick the tokens whose exact keys and values come back from host memory.

Zhang et al., 2024, "PQCache: Product Quantization-based KVCache for Long Context LLM Inference"
(arXiv:2407.12820). KV retrieval as nearest-neighbour search: at prefill, each KV head's keys are
product-quantized (``m`` sub-spaces, ``2**bits`` centroids each, k-means on the device with a fixed
number of seeded Lloyd iterations); the codes and centroids stay on the device, exact keys and
values go to host memory (:class:`PQSegment`). At each step, the codes give approximate scores, the
top ``k`` tokens per KV head are fetched exactly, and attention runs exactly over them plus a local
window of the most recent tokens, kept whole on the device.

The window: after each re-store it holds the last ``window`` tokens of each (sequence, head); decoded
tokens join it and, once it holds ``2 * window`` (at least 1), the older half is coded with the
existing codebooks and offloaded, so coding and transfers happen once per ``window`` steps. ``k``
(or ``fraction``) counts the offloaded tokens. Codebooks are trained once, on the first tokens that
leave the window (usually the prompt's), and reused for every later token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cache.layer import LayerKV
from ..cache.offload import TopN
from ..cache.pq import PQSegment
from ..cache.segments import DenseSegment
from ..shape import KVShape
from .base import Method, Observation
from .registry import register


@register
@dataclass
class PQCache(Method):
    """Keys product-quantized on the device, exact K/V in host memory; each step fetches the top ``k`` (or ``fraction``)."""

    m: int = 2
    bits: int = 6
    k: int | None = None
    fraction: float | None = None
    window: int = 64
    iterations: ClassVar[int] = 10  # Lloyd iterations: a fixed cost, enough for codes that only rank tokens
    seed: ClassVar[int] = 0
    name = "pqcache"
    summary = "product-quantized keys select top-k tokens fetched exactly from host memory (offloading)"
    paper = "Zhang et al. 2024, PQCache: Product Quantization-based KVCache for Long Context LLM Inference, arXiv:2407.12820"

    def validate(self) -> None:
        if (self.k is None) == (self.fraction is None):
            raise ValueError(f"{self.name}: give exactly one of k (tokens per KV head fetched per step) or fraction (in (0, 1])")
        if self.k is not None and self.k < 1:
            raise ValueError(f"{self.name}: k={self.k} must be a positive number of tokens per KV head")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"{self.name}: fraction={self.fraction} must be in (0, 1]")
        if self.m < 1:
            raise ValueError(f"{self.name}: m={self.m} must be >= 1 (sub-spaces; it must divide the head dimension)")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"{self.name}: bits={self.bits} must be in 1..8 (2**bits centroids per sub-space)")
        if self.window < 0:
            raise ValueError(f"{self.name}: window={self.window} must be >= 0")

    def check_hybrid(self, parts: list[Method], position: int) -> None:
        if position != len(parts) - 1:
            raise ValueError(f"{self.name} re-stores the tokens it is given, so it must come last: e.g. 'snapkv+pqcache'")

    def on_prefill(self, obs: Observation) -> None:
        self._offload(obs.layer)

    def on_decode(self, obs: Observation) -> None:
        segments = obs.layer.segments
        local = segments[1:] if isinstance(segments[0], PQSegment) else segments
        if sum(s.longest for s in local) >= max(2 * self.window, 1):
            self._offload(obs.layer)

    def _offload(self, layer: LayerKV) -> None:
        """Code and offload every token older than the window; keep the window on the device."""
        coded = layer.segments[0] if isinstance(layer.segments[0], PQSegment) else None
        local = layer.segments[1:] if coded is not None else layer.segments
        if not all(isinstance(s, DenseSegment) for s in local):
            raise ValueError(f"{self.name} stores plain key/value storage; it can follow eviction methods only")
        parts = [s.dense() for s in local]
        keys, values, valid = (torch.cat([p[i] for p in parts], 2) for i in range(3))
        rank = valid.long().cumsum(-1) - 1
        recent = valid & (rank >= valid.sum(-1, keepdim=True) - self.window)
        old = valid & ~recent
        if not bool(old.any()):
            return
        if coded is None:
            coded = PQSegment.build(keys, values, old, self.m, self.bits, TopN(self.k, self.fraction),
                                    self.iterations, self.seed)
        else:
            coded = coded.extend(keys, values, old)
        kept = DenseSegment.from_padded(keys, values, recent)
        layer.replace([coded, kept] if kept.tokens else [coded])  # type: ignore[list-item]

    def storage_bytes(self, shape: KVShape, tokens: list[float]) -> int:
        """Device bytes right after prefill (what ``kvslim calc`` shows): the window's exact K/V, one byte per
        code (``m`` per token and KV head) and the centroids; exact K/V of coded tokens are in host memory."""
        total = 0.0
        for t in tokens:
            exact = min(t, self.window)
            coded = t - exact
            centroids = 2**self.bits * shape.head_dim * shape.element_bytes if coded > 0 else 0
            total += shape.num_kv_heads * (exact * 2 * shape.head_dim * shape.element_bytes + coded * self.m + centroids)
        return int(round(total))
