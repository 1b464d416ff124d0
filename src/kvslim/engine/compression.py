"""Drive a kvslim method inside the engine with the same method objects as the Hugging Face path.

After a sequence's prefill attention in each layer, its keys, values and queries become a
:class:`LayerKV` and an :class:`Observation`; ``policy.on_prefill`` evicts exactly as it does
under ``kvslim.Cache``; the kept tokens (left-aligned per head, in time order) are then written
into the sequence's blocks, so a compressed sequence holds fewer blocks.

What the engine supports, and why:

* **ragged heads and layers** (AdaKV, PyramidKV): every (layer, KV head) keeps its own length,
  padded within the sequence's blocks; a sequence takes blocks for its *longest* head, so the
  memory saved is set by the longest head, not the mean (AdaKV saves less here than its bytes
  accounting in the Hugging Face path says).
* **decode-time eviction**: StreamingLLM only. Its rule needs no scores (sinks + the newest
  tokens), so the window slides by moving a start slot, exactly as its ``on_decode`` would, and
  blocks the window has passed are handed back. Methods that rescore on every step (H2O, TOVA)
  would need each step's attention weights over the pages; they are refused with a clear error.
* **storage formats** (ThinK's pruned channels, quantized segments): pages hold keys and values in
  the model's dtype, so methods that change how tokens are stored are refused.
* **prefix sharing** is for the full cache only: what a method keeps of a block depends on the
  whole prompt, so compressed blocks are never shared between prompts.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..cache.layer import LayerKV
from ..cache.segments import DenseSegment
from ..methods import Chain, Method, Observation, ScoredEviction
from ..methods.adakv import AdaKV
from ..methods.full import Full
from ..methods.streaming import Streaming


def _parts(policy: Method) -> list[Method]:
    return list(policy.parts) if isinstance(policy, Chain) else [policy]


class Compression:
    """One policy, checked once for what the engine can do, then applied per sequence and layer."""

    def __init__(self, policy: Method, num_layers: int, num_kv_heads: int, head_dim: int, scaling: float):
        self.policy, self.num_layers, self.scaling = policy, num_layers, scaling
        self.full = isinstance(policy, Full)
        self.window = policy if isinstance(policy, Streaming) else None
        rescoring = [p.name for p in _parts(policy) if isinstance(p, ScoredEviction) and p.decode_time]
        if rescoring and self.window is None:
            raise ValueError(
                f"policy {policy.spec}: {', '.join(rescoring)} evicts on every decoding step from attention scores, "
                "which the paged engine does not compute; use it through kvslim.Cache, or use streaming/snapkv here"
            )
        self.ragged_heads = any(isinstance(p, AdaKV) for p in _parts(policy))
        self._probe(num_kv_heads, head_dim)

    def _probe(self, heads: int, dim: int) -> None:
        """Run the policy once on random data: refuse methods that re-store tokens in another format."""
        gen = torch.Generator().manual_seed(0)
        keys, values = (torch.randn(1, heads, 64, dim, generator=gen) for _ in range(2))
        layer = self._layer(0, keys, values)
        self.policy.on_prefill(Observation(layer, self.num_layers, torch.randn(1, heads, 64, dim, generator=gen),
                                           self.scaling, "prefill"))
        formats = sorted({type(s).__name__ for s in layer.segments if not isinstance(s, DenseSegment)})
        if formats:
            raise ValueError(
                f"policy {self.policy.spec} stores tokens as {', '.join(formats)}; the engine's pages hold keys and "
                "values in the model dtype, so only eviction methods run here (use kvslim.Cache for this one)"
            )

    @staticmethod
    def _layer(index: int, keys: Tensor, values: Tensor) -> LayerKV:
        layer = LayerKV(index)
        layer.append(keys, values)
        prompt = torch.full((keys.shape[0],), keys.shape[2], dtype=torch.long, device=keys.device)
        layer.state["prompt"] = layer.state["real"] = prompt
        return layer

    def reserve(self, n_tokens: int) -> int:
        """Slots a sequence of ``n_tokens`` needs right after its prefill (the blocks admission must find)."""
        if self.full or self.ragged_heads:
            return n_tokens
        planned = max(self.policy.planned_tokens(n_tokens, i, self.num_layers) for i in range(self.num_layers))
        return min(n_tokens, int(planned))

    def __call__(self, layer_idx: int, queries: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (Hq,T,D), keys/values (H,T,D) of one sequence -> kept keys, values (H,T',D) and lengths (H,)."""
        layer = self._layer(layer_idx, keys[None], values[None])
        self.policy.on_prefill(Observation(layer, self.num_layers, queries[None], self.scaling, "prefill"))
        kept_k, kept_v, valid = layer.dense(keys.dtype)
        return kept_k[0], kept_v[0], valid[0].sum(-1)

    def start_window(self, seq_len: int) -> tuple[int, int] | None:
        """(sinks, budget) of a sliding window for a prefill of ``seq_len`` tokens, or None."""
        if self.window is None:
            return None
        budget = int(self.window.tokens_for(seq_len))
        return min(self.window.sinks, budget), budget
