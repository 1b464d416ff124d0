"""Merging: what a scorer evicts is folded into what it keeps instead of being lost.

CaM (Zhang et al. 2024, "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML) and D2O (Wan et al.
2024, "D2O: Dynamic Discriminative Operations for Efficient Generative Inference of Large Language Models",
arXiv:2406.13035) keep the tokens a scorer ranks highest and merge each evicted token's value into the kept
token of the same sequence and KV head whose key is most similar (cosine). ``merge(snapkv)``,
``merge(h2o)``, ``merge(expected_attention)``; the scorer's parameters pass through
(``merge(snapkv,keep=0.25)``, ``merge(snapkv(window=16))``), exactly as for ``adakv(SCORER)``.

The merged value of a kept token ``j`` is the weighted mean of its own value and those of the evicted tokens
``M(j)`` whose nearest kept key is ``j``::

    v_j' = (w_j v_j + sum_{i in M(j)} w_i v_i) / (w_j + sum_{i in M(j)} w_i),   w = softmax(scores) per head

Weights are the scorer's own scores, softmax-normalised over each (sequence, KV head)'s held tokens: scorers
disagree on sign and scale (KeyDiff's scores are negative cosines, H2O's accumulate), and a softmax turns any
of them into positive weights where a token the scorer ranks higher counts more (the normaliser cancels in
the mean). Keys stay the kept keys, so attention still ranks tokens by the kept keys while the values carry
part of what was evicted. Nothing extra is stored: the cache holds exactly the kept rows.

Only kept tokens held in the model's dtype take merged values: a token already packed by a quantizer is not
re-encoded (that would add quantization error at every eviction), so evicted tokens go to their most similar
kept token among the full-precision ones. At prefill (``merge(snapkv)+kivi4``) every token is still in the
model's dtype, so all merge; the quantizer then packs the merged values.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cache
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Observation, ScoredEviction, scorer_with
from .registry import register
from .snapkv import SnapKV

#: similarities (B x H x rows x T) computed at once while finding nearest kept keys: bounds the working memory
_SIMILARITIES = 1 << 26


def merged_values(keys: Tensor, values: Tensor, scores: Tensor, keep: Tensor, evicted: Tensor,
                  targets: Tensor) -> Tensor:
    """Values (B,H,T,Dv) after folding each ``evicted`` token into its most key-similar token among ``targets``.

    ``keys`` (B,H,T,D), ``values`` (B,H,T,Dv) and ``scores`` (B,H,T) over one layer's dense layout; ``keep``,
    ``evicted`` and ``targets`` (B,H,T) masks (``targets`` within ``keep``). Rows outside ``keep`` are left as
    they are (they are about to be dropped); a row with no target merges nothing. Computed in float32.
    """
    held = keep | evicted
    weights = torch.exp(scores.float() - scores.float().masked_fill(~held, float("-inf")).amax(-1, keepdim=True))
    weights = weights.masked_fill(~held, 0.0).nan_to_num(0.0)
    unit = F.normalize(keys.float(), dim=-1)
    nearest = torch.empty(scores.shape, dtype=torch.long, device=keys.device)
    chunk = max(1, _SIMILARITIES // max(1, scores.numel()))
    for start in range(0, keys.shape[2], chunk):
        sims = unit[:, :, start : start + chunk] @ unit.transpose(-1, -2)  # (B,H,chunk,T)
        nearest[:, :, start : start + chunk] = sims.masked_fill(~targets[:, :, None], float("-inf")).argmax(-1)
    moving = evicted & targets.any(-1, keepdim=True)
    mass = (weights * moving).unsqueeze(-1)  # (B,H,T,1): an evicted token's weight, 0 for every other row
    index = nearest.unsqueeze(-1)
    total = (weights * keep).unsqueeze(-1) * values.float()
    total = total.scatter_add(2, index.expand_as(total), mass * values.float())
    weight = (weights * keep).unsqueeze(-1).scatter_add(2, index, mass)
    merged = torch.where(weight > 0, total / weight.clamp(min=torch.finfo(torch.float32).tiny), values.float())
    return torch.where(targets.unsqueeze(-1), merged, values.float()).to(values.dtype)


@dataclass
class Merging(ScoredEviction):
    """A scorer's selection whose evicted values are merged into the kept ones (see the module docstring)."""

    name = "merge"
    #: the scorer this class merges for (None for the registered ``merge``, which merges for SnapKV)
    merges: ClassVar[type[ScoredEviction] | None] = None

    def kept_values(self, obs: Observation, scores: Tensor, keep: Tensor) -> Tensor:
        targets = keep & obs.layer.rewritable()
        return merged_values(obs.keys, obs.values, scores, keep, obs.valid & ~keep, targets)

    @classmethod
    def wrap(cls, scorer: ScoredEviction) -> ScoredEviction:
        """``scorer`` whose evicted tokens merge into its kept ones: ``merge(h2o)``."""
        if not isinstance(scorer, ScoredEviction) or isinstance(scorer, Merging):
            raise ValueError(f"merge folds what a scorer evicts into what it keeps; {scorer.name} is not a token "
                             "scorer (or already merges): wrap one such as snapkv, h2o, tova, expected_attention, "
                             "keydiff, lagkv, knorm or adakv(SCORER)")
        params = {f.name: getattr(scorer, f.name) for f in fields(scorer) if f.init}
        return _merging(type(scorer))(**params)

    @property
    def spec(self) -> str:
        if self.name != Merging.name:  # a wrapper around this merging scorer (adakv(merge(...))) names itself
            return super().spec
        inner = self.merges or SnapKV
        return f"merge({inner(**{f.name: getattr(self, f.name) for f in fields(inner) if f.init}).spec})"


@register
@dataclass
class Merge(SnapKV, Merging):
    """``merge`` alone merges for SnapKV, the scorer it is most often paired with."""

    name = "merge"
    summary = ("evicted values merge into the kept token with the most similar key, weighted by the scorer's "
               "softmaxed scores (CaM/D2O); merge(SCORER) for any scorer, merge alone wraps snapkv")
    paper = ("Zhang et al. 2024, CaM: Cache Merging for Memory-efficient LLMs Inference (ICML); Wan et al. 2024, "
             "D2O, arXiv:2406.13035")


@cache
def _merging(scorer: type[ScoredEviction]) -> type[ScoredEviction]:
    """The subclass of ``scorer`` that merges what it evicts (one per scorer class)."""
    if scorer is SnapKV:
        return Merge
    # the spec is set here because a wrapped adakv(SCORER) defines one that would otherwise come first
    return scorer_with(scorer, Merging, "Merge", name="merge", merges=scorer, spec=Merging.spec)
