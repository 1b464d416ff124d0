"""auto: the budget is set per request, per layer and per KV head from the prompt's observed attention.

A fixed ``keep`` gives every prompt, layer and head the same share. But a head that attends to three tokens
needs three, and a diffuse one needs many; a short pointed prompt needs less than a long spread-out one.
``auto`` reads that from the attention of the prompt's last queries (the scorer's observation window, at least
:data:`MASS_WINDOW`), each KV head's *observed mass* (B,H,T: the window's attention summed over its queries and
its query group), and sets the budgets in one of two modes:

* **accuracy tolerance** ``auto(tolerance=0.05)``: each (layer, KV head) keeps its protected tokens (the
  scorer's window and sinks), then the fewest others, taken in the scorer's keeping order, that cover
  ``1 - tolerance`` of *each* window query's attention on the tokens it may drop (:func:`coverage`). Two things
  in that rule are what makes it keep a needle (RULER niah on Qwen2.5-0.5B): the protected tokens' own mass is
  left out (the window attends 15-60% of a head's mass to itself, so it alone met the tolerance), and every
  query is covered, not their summed mass (most queries rest on the template and punctuation, which then met
  the tolerance for all while the question's query that reads the needle lost it). Nothing fixes the bytes: a
  diffuse prompt keeps more than a peaked one, and the RULER report places such a run by the bytes it measured
  (:func:`kvslim.bench.ruler.leaderboard.placed`). ``tolerance=0`` keeps all.
* **memory target** ``auto(keep=0.25)`` (or ``budget=N`` tokens per head): the mean kept share over the
  request's layers and heads is ``keep``, so the bytes equal a fixed ``keep`` method's, but layers whose
  attention is diffuse get more and focused ones less, and within a layer the heads share it out.

Per layer (memory target): a layer's *need* is the mean over its heads of the entropy of the head's normalised
mass over its largest, ``log(tokens held)`` (:func:`dispersion`, as CAKE's spatial dispersion). Layer ``l`` is
compressed as soon as its attention is seen (the engine writes each layer's kept tokens into pages before the
next layer runs), so its budget cannot wait for the later layers: a *ledger* carried across the layers of the
request's forward keeps what earlier layers were owed and spent. Layer ``l`` gets the fixed budget scaled by
its need over the mean need seen so far (the later layers are expected to need what the earlier ones did on
average), plus an even share of what earlier layers left over or overdrew; the last layer takes exactly what
is left, so the request's mean share is ``keep`` (to the token, unless a layer could not hold it).

Per head (memory target): the layer's tokens go to the heads' tokens of highest normalised mass across all the
layer's heads (AdaKV's rule, over mass rather than scores: it covers the most attention), each head first
keeping ``floor`` x the fixed budget (so no layer or head is starved by a misjudged observation) and its
protected tokens. Under a tolerance each head keeps at least ``floor`` x the mean budget of the request's heads
so far (this layer's and the earlier layers'), so a layer whose attention looks peaked is not starved next to
the others. At least one token per head always stays.

Which tokens a head keeps is its scorer's: ``auto`` scores with SnapKV's window votes; ``auto(SCORER, ...)``
(``auto(keydiff,keep=0.25)``, ``auto(expected_attention(history=16),tolerance=0.1)``) with any token scorer,
whose budget parameters go to ``auto``. Heads and layers keep different lengths (ragged, as AdaKV's), so
tokens are physically dropped under ``kvslim.Cache`` and in the engine; the engine takes blocks for the
longest head. What was chosen is each layer's ``state["budget"]`` (B,H) and :attr:`AutoBudget.chosen`.

Both backends run a forward's layers in order, 0 first, which is when the ledger starts over; a policy object
serves one forward at a time (as every method's per-call state assumes).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, ClassVar

import torch
from torch import Tensor

from .adakv import AdaptiveHeads
from .base import Observation, ScoredEviction, keep_top, scorer_with
from .registry import register
from .snapkv import SnapKV

_BUDGET_PARAMS = ("keep", "budget", "tolerance", "floor")
#: the fewest prompt queries whose attention sets the budgets (SnapKV's observation window): a scorer that looks at
#: fewer (KeyDiff looks at none) would otherwise budget from the last token's attention alone
MASS_WINDOW = 32


def observed_mass(attention: Tensor) -> Tensor:
    """(B,H,T) share of each KV head's attention (B,H,w,T: :meth:`Observation.attention` of the last ``w`` queries)
    on each held token (sums to 1 per head; 0 everywhere for a head whose queries see nothing)."""
    mass = attention.sum(2)
    return mass / mass.sum(-1, keepdim=True).clamp(min=torch.finfo(mass.dtype).tiny)


def coverage(ranked: Tensor, attention: Tensor, share: float) -> Tensor:
    """(B,H) fewest tokens, taken in ``ranked`` order (B,H,T, highest first), whose attention reaches ``share`` of
    *each* query's total (``attention`` B,H,w,T); at least 1.

    Each query, not their sum: the sum is dominated by the many queries that rest on sink-like tokens (the
    template, punctuation), so a few of those meet the share while the one query that reads the needle (the
    question's) loses most of what it attends to."""
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    covered = attention.gather(-1, order.unsqueeze(-2).expand_as(attention)).cumsum(-1)
    wanted = share * attention.sum(-1, keepdim=True)
    return ((covered < wanted).sum(-1).amax(-1) + 1).clamp(max=ranked.shape[-1])


def whole_ties(ranked: Tensor, k: Tensor) -> Tensor:
    """(B,H) ``k`` grown to every held token scored as the ``k``-th (``ranked`` B,H,T): a pooled scorer (SnapKV's
    max pooling) gives a hit's neighbours its score so a number is kept whole, and a count that stops at the hit
    would keep its older half only (ties go to the older token)."""
    last = ranked.sort(dim=-1, descending=True).values.gather(-1, (k - 1).clamp(min=0).unsqueeze(-1))
    tied = (ranked >= last) & (ranked > float("-inf"))
    return torch.maximum(k, tied.sum(-1))


def dispersion(mass: Tensor, held: Tensor) -> Tensor:
    """(B,) a layer's need: the mean over heads of the entropy of each head's mass over its most, ``log(held)``
    (0 when a head attends to one token, 1 when evenly to all ``held`` (B,H) tokens it holds).

    Entropy rather than the number of tokens attended (its exponential): attention concentration spans orders of
    magnitude across a model's layers (the first layers attend nearly evenly), and budgets in proportion to
    token counts would starve every other layer for the first ones."""
    entropy = -(mass * mass.clamp(min=torch.finfo(mass.dtype).tiny).log()).sum(-1)
    return (entropy / held.clamp(min=2).log()).clamp(0, 1).mean(-1)


@dataclass
class Ledger:
    """One request's running account across the layers of a forward (per sequence, (B,) tensors)."""

    owed: Tensor  # tokens the fixed budget would have kept in the layers so far
    spent: Tensor  # tokens kept there
    need: Tensor  # sum of the layers' needs so far
    layers: int = 0

    def share(self, fixed: Tensor, need: Tensor, layer: int, num_layers: int) -> Tensor:
        """Tokens (B,) for this layer, whose fixed budget is ``fixed`` (B,) and need ``need`` (B,)."""
        self.owed, self.need, self.layers = self.owed + fixed, self.need + need, self.layers + 1
        left = num_layers - layer
        carry = self.owed - fixed - self.spent  # what earlier layers left over (negative: overdrew)
        if left == 1:
            return fixed + carry
        mean = self.need / self.layers
        return fixed * need / mean.clamp(min=torch.finfo(mean.dtype).tiny) + carry / left


@dataclass
class AutoBudget(ScoredEviction):
    """Budgets per request, layer and KV head from the observed attention (see the module docstring)."""

    tolerance: float | None = None
    #: every head keeps at least this share of the fixed budget (memory target) or of the request's mean so far
    #: (tolerance)
    floor: float = 0.2
    #: the layers' budgets (B,H) of the last forward, in layer order: what ``auto`` chose
    chosen: list[Tensor] = field(default_factory=list, init=False, repr=False, compare=False)
    ledger: Ledger | None = field(default=None, init=False, repr=False, compare=False)
    name = "auto"
    #: the scorer this class sets budgets for (None for the registered ``auto``, which scores with SnapKV)
    scorer: ClassVar[type[ScoredEviction] | None] = None
    #: its scorer is built whole, then only its scoring parameters are taken (see :func:`kvslim.methods.registry`)
    scorer_defaults: ClassVar[dict[str, Any]] = {"keep": 1.0}

    def validate_budget(self) -> None:
        given = [n for n in ("keep", "budget", "tolerance") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"{self.name}: give exactly one of keep (mean share kept, in (0, 1]), budget (mean tokens "
                             "per KV head) or tolerance (attention mass each head may lose, in [0, 1)), e.g. "
                             "auto(keep=0.25) or auto(tolerance=0.05)")
        if self.tolerance is not None and not 0 <= self.tolerance < 1:
            raise ValueError(f"{self.name}: tolerance={self.tolerance} must be in [0, 1): the share of each head's "
                             "observed attention mass it may drop, e.g. 0.05")
        if not 0 <= self.floor <= 1:
            raise ValueError(f"{self.name}: floor={self.floor} must be in [0, 1]: the share of the fixed budget "
                             "(memory target) or of the request's mean budget so far (tolerance) every head keeps")

    def on_prefill(self, obs: Observation) -> None:
        raw = self.score(obs).float()
        ranked = self.ranked(obs, raw)
        held = obs.valid.sum(-1)
        attention = obs.attention(max(self.observed, MASS_WINDOW))
        if self.tolerance is not None:
            k = self.by_tolerance(ranked, attention, held, obs.layer_idx)
        else:
            k = self.by_memory(obs, ranked, observed_mass(attention))
        obs.layer.state["budget"] = k
        self.chosen = [*self.chosen[: obs.layer_idx], k]
        if self.decodes:
            self.remember(obs)
        self.evict(obs, k, raw)

    def by_tolerance(self, ranked: Tensor, attention: Tensor, held: Tensor, layer: int) -> Tensor:
        """(B,H) each head's protected tokens and the fewest others covering ``1 - tolerance`` of each window query's
        attention (B,H,w,T) on the tokens it may drop; at least ``floor`` x the mean over this layer's and the
        earlier layers' heads."""
        if self.tolerance == 0:
            return held
        protected = ranked == float("inf")
        # protected tokens come first in ``ranked`` with no attention here, so they are counted but cover nothing
        droppable = attention.masked_fill(protected.unsqueeze(-2), 0.0)
        k = whole_ties(ranked, torch.maximum(coverage(ranked, droppable, 1 - self.tolerance), protected.sum(-1)))
        seen = torch.cat([*self.chosen[:layer], torch.minimum(k, held)], -1).float()
        least = torch.ceil(seen.mean(-1, keepdim=True) * self.floor).long().clamp(min=1)
        return torch.minimum(torch.maximum(k, least), held)

    def by_memory(self, obs: Observation, ranked: Tensor, mass: Tensor) -> Tensor:
        """(B,H) this layer's share of the request's budget (the ledger), spread over its heads by mass."""
        held = obs.valid.sum(-1)
        if obs.layer_idx == 0 or self.ledger is None:
            zero = torch.zeros(held.shape[0], dtype=torch.float64, device=held.device)
            self.ledger = Ledger(zero, zero.clone(), zero.clone())
        prompt = obs.layer.state["prompt"].unsqueeze(-1).expand_as(held)
        fixed = torch.minimum(self.tokens_for(prompt), held)  # type: ignore[arg-type]
        least = torch.minimum(torch.ceil(fixed * self.floor).long().clamp(min=1), held)
        need = dispersion(mass, held).double()
        wanted = self.ledger.share(fixed.sum(-1).double(), need, obs.layer_idx, obs.num_layers)
        total = torch.minimum(torch.maximum(wanted.round().long(), least.sum(-1)), held.sum(-1))
        k = self.spread(ranked, mass, total, least)
        self.ledger.spent = self.ledger.spent + k.sum(-1)
        return k

    def spread(self, ranked: Tensor, mass: Tensor, total: Tensor, least: Tensor) -> Tensor:
        """(B,H) how many of a layer's ``total`` (B,) tokens each head keeps: its ``least`` (B,H) first, then its
        protected tokens, then the tokens of highest mass across the layer's heads."""
        batch, heads, length = ranked.shape
        first = keep_top(ranked, least)
        order = mass + 2.0 * (ranked == float("inf")) + 4.0 * first
        order = order.masked_fill(ranked == float("-inf"), float("-inf"))
        picked = keep_top(order.view(batch, 1, heads * length), total[:, None]).view(batch, heads, length)
        return picked.sum(-1)

    def planned_tokens(self, n_tokens: int, layer_idx: int, num_layers: int) -> float:
        """The mean under a memory target; under a tolerance the budget is known only once the prompt is seen, so
        what is planned for is all of it."""
        return float(n_tokens) if self.tolerance is not None else super().planned_tokens(n_tokens, layer_idx, num_layers)

    @classmethod
    def wrap(cls, scorer: ScoredEviction, keep: float | None = None, budget: int | None = None,
             tolerance: float | None = None, floor: float = 0.2) -> ScoredEviction:
        """``scorer`` with budgets set by ``auto``: ``auto(keydiff,keep=0.25)``, ``auto(snapkv(window=16),tolerance=0.1)``."""
        if not isinstance(scorer, ScoredEviction) or isinstance(scorer, (AutoBudget, AdaptiveHeads)) \
                or type(scorer).on_prefill is not ScoredEviction.on_prefill:
            raise ValueError(f"auto sets the budgets of a token scorer that selects once per prefill; {scorer.name} "
                             "is not one: wrap snapkv, expected_attention, keydiff, lagkv, knorm or tova")
        if scorer.keep != cls.scorer_defaults["keep"] or scorer.budget is not None:
            raise ValueError(f"auto sets {scorer.name}'s budget: give keep, budget or tolerance to auto, e.g. "
                             f"auto({scorer.name},keep=0.25)")
        params = {f.name: getattr(scorer, f.name) for f in fields(scorer) if f.init and f.name not in ("keep", "budget")}
        return _auto(type(scorer))(**params, keep=keep, budget=budget, tolerance=tolerance, floor=floor)

    @property
    def spec(self) -> str:
        if self.scorer is None:
            return super().spec
        inner = ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self.scorer)
                         if f.repr and f.name not in _BUDGET_PARAMS)
        own = ",".join(f"{n}={getattr(self, n)}" for n in _BUDGET_PARAMS if getattr(self, n) is not None)
        return f"auto({self.scorer.name}({inner}),{own})"


@register
@dataclass
class Auto(SnapKV, AutoBudget):
    """SnapKV's window votes choose the tokens; the observed attention sets how many (see the module docstring)."""

    name = "auto"
    summary = ("budget per request, layer and KV head from the observed attention: auto(keep=K) holds a mean share "
               "K (bytes of a fixed keep), auto(tolerance=E) keeps what covers 1-E of each head's attention; "
               "auto(SCORER,...) for any scorer")
    paper = ("kvslim; per-head shares as Feng et al. 2024 (Ada-KV, arXiv:2407.11550), per-layer from attention "
             "entropy as Qin et al. 2025 (CAKE, arXiv:2503.12491)")


@cache
def _auto(scorer: type[ScoredEviction]) -> type[ScoredEviction]:
    """The subclass of ``scorer`` whose budgets ``auto`` sets (one per scorer class)."""
    if scorer is SnapKV:
        return Auto
    return scorer_with(scorer, AutoBudget, "Auto", name="auto", scorer=scorer)

