"""KVzip: query-agnostic scores from context reconstruction: keep what the model reads to repeat the context.

Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"
(arXiv:2505.23416). After the prefill, the model is prompted to repeat the context (``REPEAT_PROMPT``,
then the context itself, as teacher-forced input) on top of the cache; a KV pair that the
reconstruction attends to is one the context cannot be rebuilt without, whatever question comes later.
A token's score is the largest attention any reconstruction query of its KV head's group pays it
(softmax over the held tokens and the reconstruction's own). The context is reconstructed in chunks
of ``chunk`` tokens, one forward each, so the attention matrix stays chunk x context; the probe
tokens are never stored (:meth:`kvslim.Cache.probing`). Cost: one more forward over the context (plus
the prompt per chunk), i.e. about twice the prefill, measured in the time to first token.

The pass needs the model, so it is driven from outside the cache: :func:`reconstruct` after the
prefill (``kvslim.generate``/``generate_ids`` call it); a cache that is decoded without it refuses.
The engine runs the same probes beside the prompt, layer by layer (see :mod:`kvslim.engine.compression`).
Per-head budgets: ``adakv(kvzip)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..hf_compat import cache_arg
from .base import Observation, ScoredEviction
from .registry import Chain, register

#: the instruction that precedes the repeated context (the paper's wording)
REPEAT_PROMPT = "\n\nRepeat the previous context exactly."


@register
@dataclass
class KVzip(ScoredEviction):
    """Max attention from a chunked context-reconstruction pass; evicts when the pass ends."""

    chunk: int = 1024
    name = "kvzip"
    summary = "query-agnostic: max attention each token gets while the model repeats the context (2nd pass)"
    paper = "Kim et al. 2025, KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction, arXiv:2505.23416"
    probes = True

    def validate(self) -> None:
        super().validate()
        if self.chunk < 1:
            raise ValueError(f"{self.name}: chunk={self.chunk} must be >= 1 (context tokens reconstructed per forward)")
        if self.decode_budget is not None or self.interval != 1:
            raise ValueError(f"{self.name} scores the prompt by reconstructing it, which decoded tokens are not: "
                             "decode_budget/interval do not apply; use e.g. expected_attention for decode-time budgets")

    def on_prefill(self, obs: Observation) -> None:
        """Set the budget; scores come from the reconstruction, so nothing is evicted yet."""
        budget = obs.layer.state["budget"] = self.layer_budget(obs, obs.valid.sum(-1))
        obs.layer.state["kvzip"] = None  # new tokens: scores from an earlier pass no longer fit the layout
        obs.layer.state["kvzip.pending"] = bool((obs.valid.sum(-1) > budget).any())

    def on_probe(self, obs: Observation, keys: Tensor, real: Tensor) -> None:
        group = obs.group
        queries = obs.queries.float()
        held = obs.keys.float().repeat_interleave(group, 1)
        own = keys.float().repeat_interleave(group, 1)
        logits = torch.cat([queries @ held.transpose(-1, -2), queries @ own.transpose(-1, -2)], -1) * obs.scaling
        q_len = queries.shape[2]
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=real.device).tril() & real[:, None, :]
        allowed = torch.cat([obs.valid.repeat_interleave(group, 1)[:, :, None, :].expand(-1, -1, q_len, -1),
                             causal[:, None].expand(-1, logits.shape[1], -1, -1)], -1)
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)[..., : held.shape[2]]
        probs = probs * real[:, None, :, None]  # padding rows of the probe vote for nothing
        batch, q_heads, _, length = probs.shape
        score = probs.amax(2).view(batch, q_heads // group, group, length).amax(2)
        past = obs.layer.state.get("kvzip")
        obs.layer.state["kvzip"] = score if past is None else torch.maximum(past, score)

    def on_probed(self, obs: Observation) -> None:
        if obs.layer.state.get("kvzip") is None:
            return
        self.evict(obs, obs.layer.state["budget"])
        obs.layer.state["kvzip"] = None
        obs.layer.state["kvzip.pending"] = False

    def score(self, obs: Observation) -> Tensor:
        return obs.layer.state["kvzip"]

    def on_decode(self, obs: Observation) -> None:
        if obs.layer.state.get("kvzip.pending"):
            raise ValueError("kvzip evicts after its reconstruction pass, which did not run: call "
                             "kvslim.methods.kvzip.reconstruct(model, cache, ids) after the prefill "
                             "(kvslim.generate does), or use a method that scores during the prefill")


def chunk_size(policy: Any) -> int:
    """Context tokens per probe of a probing policy (the smallest kvzip part's ``chunk``)."""
    parts = policy.parts if isinstance(policy, Chain) else [policy]
    sizes = [p.chunk for p in parts if isinstance(p, KVzip)]
    if not sizes:
        raise ValueError(f"policy {policy.spec} does not probe: reconstruct() is for kvzip (or adakv(kvzip))")
    return min(sizes)


@torch.inference_mode()
def reconstruct(model: Any, cache: Any, ids: Tensor, mask: Tensor | None = None, repeat: Sequence[int] = ()) -> None:
    """KVzip's scoring pass over a prefilled ``kvslim.Cache``, then its eviction.

    ``ids`` (B, T) is the context the cache was prefilled with (left-padded where ``mask`` (B, T) is 0);
    ``repeat`` the token ids of the repeat instruction (:data:`REPEAT_PROMPT` in the model's tokenizer; empty,
    the copy simply follows the context). Every row is cut into chunks from its own first token, so a
    row's scores do not depend on the batch it is in; chunk ``c`` of every row goes in one probe forward
    (left-padded), at the positions that follow its row's context. Leaving the probe block evicts.
    """
    chunk = chunk_size(cache.policy)
    mask = torch.ones_like(ids) if mask is None else mask.to(ids.device)
    rows = [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
    context = mask.sum(-1, keepdim=True)
    seen = torch.ones(len(rows), cache.get_seq_length(), dtype=torch.long, device=ids.device)
    with cache.probing():
        for start in range(0, max(len(r) for r in rows), chunk):
            pieces = [list(repeat) + r[start : start + chunk] if start < len(r) else [] for r in rows]
            width = max(len(p) for p in pieces)
            inputs = torch.zeros(len(rows), width, dtype=ids.dtype)
            real = torch.zeros(len(rows), width, dtype=torch.long)
            for b, piece in enumerate(pieces):
                inputs[b, width - len(piece) :] = torch.tensor(piece, dtype=ids.dtype)
                real[b, width - len(piece) :] = 1
            inputs, real = inputs.to(ids.device), real.to(ids.device)
            positions = context + (real.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=inputs, attention_mask=torch.cat([seen, real], 1), position_ids=positions,
                  **cache_arg(cache), use_cache=True, logits_to_keep=1)
