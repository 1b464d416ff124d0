"""The method API: what a method sees (an :class:`Observation`) and what it may do to a layer.

A method is a small dataclass. Most only say how to *score* tokens (kvpress's shape): the shared
:class:`ScoredEviction` turns scores into a budget-sized selection and physically drops the rest.
Methods that change *how* tokens are stored (channel pruning, quantization) replace the layer's
segments. Storage backends (the Hugging Face cache, the paged engine) build observations and call
:meth:`Method.on_prefill` / :meth:`Method.on_decode`; they never know which method runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cached_property
from typing import ClassVar

import numpy
import torch
from torch import Tensor

from ..cache.layer import LayerKV
from ..cache.segments import group_rows, grouped_logits
from ..shape import KVShape


@dataclass
class Observation:
    """What a method may look at for one layer after the newest tokens were appended."""

    layer: LayerKV
    num_layers: int
    queries: Tensor  # (B, Hq, q, D) queries of this forward, after RoPE
    scaling: float
    phase: str  # "prefill" (a prompt chunk), "decode" (one new token) or "probe" (see Method.on_probe)
    softcap: float | None = None  # Gemma 2's logit softcapping: logits become softcap * tanh(logits / softcap)
    #: RoPE inverse frequencies (D/2,) in float32, half-split layout as in Hugging Face; None where unknown.
    #: Methods that project queries to future positions (ExpectedAttention) need them.
    rope: Tensor | None = None

    @property
    def layer_idx(self) -> int:
        return self.layer.layer_idx

    @property
    def q_len(self) -> int:
        return self.queries.shape[2]

    @cached_property
    def _dense(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.layer.dense(self.queries.dtype)

    @property
    def keys(self) -> Tensor:
        """(B, H, T, D) keys of the layer in the dense layout (padding where ``valid`` is False)."""
        return self._dense[0]

    @property
    def values(self) -> Tensor:
        return self._dense[1]

    @property
    def valid(self) -> Tensor:
        """(B, H, T) True where a real token is held."""
        return self._dense[2]

    @property
    def group(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    def attention(self, window: int) -> Tensor:
        """Softmax attention (B, H, w, T) of the last ``window`` queries, averaged over each KV head's query group.

        Computed for the window only, in float32, so scoring never needs eager attention on the model. The G query
        heads of a KV head are G*w rows against its keys (:func:`grouped_logits`): keys are never repeated per query
        head, which for a decoding step over a whole cache was most of the work.
        """
        w = min(window, self.q_len)
        logits = grouped_logits(self.queries[:, :, -w:], self.keys, self.scaling)  # (B, H, G*w, T)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        logits = logits.masked_fill(~group_rows(self.visible(w), self.group), float("-inf"))
        # a query sees nothing once its own token is gone (a sliding-window layer keeps only its window): no votes
        probs = logits.softmax(-1).nan_to_num(0.0)
        return probs.view(*logits.shape[:2], self.group, w, -1).mean(2)

    def visible(self, w: int) -> Tensor:
        """(B, H, w, T) which keys each of the last ``w`` queries may attend to (held and not in its future).

        Works on time ranks, not columns: the newest tokens are the latest ranks whatever the layout
        (batch padding removed, ragged heads), so query j of the window sees ranks <= count - w + j.
        """
        rank, count = self.time_rank()
        offset = torch.arange(w, device=rank.device) - w  # (w,)
        limit = count[:, :, None] + offset  # (B, H, w)
        return self.valid[:, :, None, :] & (rank[:, :, None, :] <= limit[..., None])

    def time_rank(self) -> tuple[Tensor, Tensor]:
        """Each held token's rank in time order (B,H,T) and the count held (B,H): for sinks and windows."""
        return self._time_rank

    @cached_property
    def _time_rank(self) -> tuple[Tensor, Tensor]:
        # computed once per observation, as its dense layout: scoring reads it twice (the window, the protected)
        rank = self.valid.long().cumsum(-1) - 1
        return rank, self.valid.sum(-1)


def keep_top(scores: Tensor, k: Tensor) -> Tensor:
    """Boolean mask (B,H,T) keeping the ``k`` (B,H) highest scores of each row; ties go to the older token."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks < k.unsqueeze(-1)


def host_range(layer: LayerKV, k: Tensor) -> tuple[int, int]:
    """The smallest and largest of a budget ``k`` (B,H), read on the host once per budget tensor (a host sync)
    and remembered in the layer's state: a decoding step that evicts against the same budget reads none."""
    cached = layer.state.get("budget.range")
    if cached is None or cached[0] is not k:
        low, high = torch.aminmax(k)
        cached = layer.state["budget.range"] = (k, int(low), int(high))
    return cached[1], cached[2]


@dataclass
class Method:
    """Base of every registered method. Subclasses are dataclasses whose fields are the parameters."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: scores come from a probing pass the driver runs after the prefill (KVzip's context reconstruction, see
    #: :meth:`kvslim.Cache.probing`); until it runs, nothing is evicted
    probes: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming any invalid parameter and its valid range."""

    def check_hybrid(self, parts: list["Method"], position: int) -> None:
        """Raise ``ValueError`` (naming a working spec) if this method cannot be part ``position`` of a hybrid."""

    def on_prefill(self, obs: Observation) -> None:
        """Called after each prompt chunk's attention; may evict or re-store the layer's tokens."""

    def before_prefill(self, obs: Observation) -> None:
        """Called by a hybrid before any of its parts acts on a prompt chunk: a later part records per-token facts
        an earlier part's eviction would lose (lowrank: each token's RoPE position, in ``state["positions"]``, which
        :meth:`LayerKV.select` keeps in step with the tokens)."""

    def on_decode(self, obs: Observation) -> None:
        """Called after each decoding step's attention."""

    def reflow(self, obs: Observation, keep: Tensor) -> None:
        """Re-lay per-token method state the way the layer's ``select(keep)`` is about to re-lay the cache.

        Called by evicting methods before they select, and by the cache when it drops tokens by itself
        (those a sliding-window layer's later queries can no longer see), so state never goes stale.
        """

    def on_probe(self, obs: Observation, keys: Tensor, real: Tensor) -> None:
        """Called for each probing forward (see :attr:`probes`): ``obs.queries`` are the probe's queries, ``keys``
        (B,H,q,D) its own keys (attended causally after the held ones, never stored), ``real`` (B,q) its non-padding."""

    def on_probed(self, obs: Observation) -> None:
        """Called once per layer when probing ends; a probing method evicts here."""

    def planned_tokens(self, n_tokens: int, layer_idx: int, num_layers: int) -> float:
        """Tokens per KV head this method holds in ``layer_idx`` right after a prefill of ``n_tokens``."""
        return float(n_tokens)

    def storage_bytes(self, shape: KVShape, tokens: list[float]) -> int:
        """Bytes held for ``tokens[l]`` tokens per KV head in each layer ``l``; storage formats override."""
        per_token = 2 * shape.num_kv_heads * shape.head_dim * shape.element_bytes
        return int(round(sum(tokens) * per_token))

    def expected_bytes(self, shape: KVShape, n_tokens: int) -> int:
        """Bytes one sequence holds after a prefill of ``n_tokens`` (what ``kvslim calc`` prints)."""
        tokens = [self.planned_tokens(n_tokens, i, shape.num_layers) for i in range(shape.num_layers)]
        return self.storage_bytes(shape, tokens)

    @property
    def spec(self) -> str:
        """The canonical spec string that rebuilds this method with :func:`kvslim.policy`."""
        params = ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.repr)
        return f"{self.name}({params})" if params else self.name

    def __str__(self) -> str:
        return self.spec


@dataclass
class ScoredEviction(Method):
    """Keep the highest-scoring tokens per KV head within a budget; subclasses define :meth:`score`.

    Budget: ``keep`` (fraction of prompt tokens, in (0, 1]) or ``budget`` (tokens per KV head).
    The first ``sinks`` and the last ``window`` tokens are always kept.
    """

    keep: float | None = None
    budget: int | None = None
    window: int = 0
    sinks: int = 0
    #: tokens per KV head held while generating (any scorer can compress during decoding); None: the method's
    #: own rule (decode-time methods hold their budget, the others let decoding grow the cache)
    decode_budget: int | None = None
    #: decoding steps between decode-time evictions: the cache grows by up to ``interval - 1`` tokens between
    #: them, and the scoring is paid once per ``interval`` tokens instead of on every token
    interval: int = 1
    #: evict on every decoding step too (StreamingLLM, H2O, TOVA), holding the budget constant.
    decode_time: ClassVar[bool] = False
    #: state entries (B,H,T over the dense layout) holding one number per held token that every decoding step adds
    #: to (H2O's accumulated attention, see :meth:`attended`); :meth:`reflow` moves them with their tokens, and a
    #: token appended since the last step has zero there
    token_state: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        self.validate_budget()
        if self.keep is not None and not 0 < self.keep <= 1:
            raise ValueError(f"{self.name}: keep={self.keep} must be in (0, 1]; e.g. keep=0.25 keeps a quarter")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"{self.name}: budget={self.budget} must be a positive number of tokens per KV head")
        for name in ("window", "sinks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{self.name}: {name}={getattr(self, name)} must be >= 0")
        if self.decode_budget is not None and self.decode_budget < 1:
            raise ValueError(f"{self.name}: decode_budget={self.decode_budget} must be a positive number of tokens per "
                             "KV head held while generating, or None")
        if self.interval < 1:
            raise ValueError(f"{self.name}: interval={self.interval} must be >= 1 (decoding steps between evictions)")

    def validate_budget(self) -> None:
        """Raise ``ValueError`` unless the budget is given one way; a method that sets budgets itself overrides it."""
        if (self.keep is None) == (self.budget is None):
            raise ValueError(f"{self.name}: give exactly one of keep (fraction in (0, 1]) or budget (tokens per KV head)")

    def score(self, obs: Observation) -> Tensor:
        """(B, H, T) importance of each held token; higher is kept."""
        raise NotImplementedError

    def tokens_for(self, n_tokens: Tensor | int) -> Tensor | int:
        """Tokens per KV head kept out of ``n_tokens`` prompt tokens (per sequence)."""
        if self.keep is not None:
            if isinstance(n_tokens, Tensor):
                return torch.clamp(torch.ceil(n_tokens * self.keep).long(), min=1)
            return max(1, math.ceil(n_tokens * self.keep))
        if isinstance(n_tokens, Tensor):
            return torch.clamp(n_tokens, max=self.budget)
        return min(n_tokens, self.budget)  # type: ignore[type-var]

    def layer_budget(self, obs: Observation, held: Tensor) -> Tensor:
        """Tokens per (sequence, KV head) to keep in this layer; ``held`` (B,H) is what it holds now.

        The budget is a share of the whole prompt seen so far (``state["prompt"]``, per sequence), so a
        prompt fed in chunks ends with the same budget as one fed at once.
        """
        prompt = obs.layer.state["prompt"].unsqueeze(-1).expand_as(held)
        return torch.minimum(self.tokens_for(prompt), held)  # type: ignore[arg-type]

    def planned_tokens(self, n_tokens: int, layer_idx: int, num_layers: int) -> float:
        return float(min(n_tokens, self.tokens_for(n_tokens)))

    def protected(self, obs: Observation) -> Tensor:
        """(B,H,T) tokens that are never evicted: the attention sinks and the recent window.

        While decoding the window holds at least the newest token: no step drops the token it just wrote.
        """
        rank, count = obs.time_rank()
        window = self.window if obs.phase == "prefill" else max(self.window, 1)
        return obs.valid & ((rank < self.sinks) | (rank >= count.unsqueeze(-1) - window))

    def ranked(self, obs: Observation, raw: Tensor) -> Tensor:
        """Scores (B,H,T) in keeping order: protected tokens first (+inf), then by ``raw`` score, padding last (-inf)."""
        return raw.masked_fill(self.protected(obs), float("inf")).masked_fill(~obs.valid, float("-inf"))

    def evict(self, obs: Observation, k: Tensor, raw: Tensor | None = None, budget: int | None = None) -> None:
        """Keep the ``k`` (B,H) best tokens per row by score and physically drop the rest; ``raw``: this
        observation's :meth:`score`, when the caller already computed it; ``budget``: ``k``'s value in every row, when
        known on the host (:meth:`uniform_budget`), so the host decides and stores without waiting for the device.

        A layer whose rows all hold the same count (an open tail) reads ``k``'s range on the host once per budget
        tensor (:func:`host_range`), so a decoding step that evicts against it makes no host sync either, and evicts
        in place (``LayerKV.select``'s ``width``; :meth:`dropped_span` when the dropped tokens are known unscored).
        Other layers say whether every row fits (:meth:`LayerKV.fits`): a sync unless they know their counts."""
        layer = obs.layer
        held = layer.held_per_row
        if held is not None:  # every row holds ``held`` tokens: decided on the host
            if budget is None:
                low, high = host_range(layer, k)
                if held <= low:
                    return
                budget = low if low == high else None
            elif held <= budget:
                return
        elif budget is not None:
            if layer.seen <= budget:
                return
        elif layer.fits(k):
            return
        per_row = type(self).choose is ScoredEviction.choose  # the top ``k`` of each row: exactly ``budget`` each
        width = budget if per_row else None
        span = None if width is None or held is None or raw is not None else self.dropped_span(obs, held, width)
        if span is not None and self.plain_selection:
            layer.drop_span(*span)
            return
        raw = self.score(obs).float() if raw is None else raw
        keep = self.choose(self.ranked(obs, raw), k) & obs.valid
        values = self.kept_values(obs, raw, keep)
        self.reflow(obs, keep)
        layer.select(keep, values, width)

    def dropped_span(self, obs: Observation, held: int, count: int) -> tuple[int, int] | None:
        """The columns [first, stop) that keeping ``count`` of the ``held`` tokens of every row drops, when they are
        one run known without scoring (StreamingLLM: the oldest after the sinks); None: score and choose."""
        return None

    @property
    def plain_selection(self) -> bool:
        """Whether an eviction only drops tokens: kept values stay as they are (no merging) and no per-token state
        follows them, so :meth:`dropped_span` may stand for the scores."""
        return type(self).kept_values is ScoredEviction.kept_values and not self.token_state

    @staticmethod
    def host_prompt(obs: Observation) -> int | None:
        """Every sequence's prompt length (``state["prompt"]``), when the host knows it without reading the device:
        the layer is one tail holding every token it has seen (a whole prompt, no batch padding, nothing dropped yet:
        the engine's prefill, a padding-free ``kvslim.Cache`` one) outside a sliding window (which caps the prompt)."""
        layer = obs.layer
        if getattr(layer, "window", None) is not None or not layer.whole or layer.seen != layer.segments[0].longest:
            return None
        return layer.seen

    def uniform_budget(self, obs: Observation) -> int | None:
        """The prefill budget :meth:`layer_budget` gives every (sequence, KV head), when the host knows it without
        reading the device (see :meth:`host_prompt`); a method with its own budget rule returns None unless it
        overrides this too.

        Computed in float32 as :meth:`tokens_for` computes it on a device tensor (``seen * keep`` in float64 may round
        to another side of an integer), so both give the same budget."""
        prompt = self.host_prompt(obs)
        if (prompt is None or type(self).layer_budget is not ScoredEviction.layer_budget
                or type(self).tokens_for is not ScoredEviction.tokens_for):
            return None
        if self.keep is None:
            return min(prompt, self.budget)  # type: ignore[type-var]
        return min(prompt, max(1, math.ceil(numpy.float32(prompt) * numpy.float32(self.keep))))

    def kept_values(self, obs: Observation, scores: Tensor, keep: Tensor) -> Tensor | None:
        """Values (B,H,T,Dv over the dense layout) the kept tokens take on when ``keep`` is applied, given the
        scorer's own ``scores`` (B,H,T); None keeps their values. Merging (:mod:`kvslim.methods.merge`) overrides it."""
        return None

    def choose(self, scores: Tensor, k: Tensor) -> Tensor:
        """Which tokens to keep given masked scores (B,H,T) and the budget ``k`` (B,H): the top ``k`` per row."""
        return keep_top(scores, k)

    @property
    def observed(self) -> int:
        """How many of the newest queries :meth:`score` looks at (its observation window)."""
        return max(self.window, 1)

    @property
    def decode_observed(self) -> int:
        """How many of the newest queries a decoding step's eviction scores with: :attr:`observed`, unless the
        decoding score needs fewer (H2O's reads its accumulated attention alone). The engine carries this many
        across steps and reads them back for each eviction (:mod:`kvslim.engine.decode_eviction`)."""
        return self.observed

    @property
    def decodes(self) -> bool:
        """Whether this method evicts while generating; ``keep=1`` alone means keep everything, always."""
        return self.decode_budget is not None or (self.decode_time and self.keep != 1.0)

    def decode_limit(self, obs: Observation) -> Tensor | None:
        """Tokens per (sequence, KV head) held while generating, or None where decoding lets the cache grow.

        ``decode_budget`` when given; else decode-time methods hold what the prefill kept (its layer budget in
        ``state["budget"]``, which a backend may widen, e.g. by a question appended after compression), and at
        least ``budget``: a prompt shorter than the budget grows up to it while generating.
        """
        if not self.decodes or "budget" not in obs.layer.state:
            return None
        kept = obs.layer.state["budget"]
        if self.decode_budget is None and self.budget is None:
            return kept
        cached = obs.layer.state.get("decode_limit")  # the same tensor every step: its host range is read once
        if cached is None or cached[0] is not kept:
            limit = torch.full_like(kept, self.decode_budget) if self.decode_budget is not None \
                else kept.clamp(min=self.budget)
            cached = obs.layer.state["decode_limit"] = (kept, limit)
        return cached[1]

    def remember(self, obs: Observation) -> Observation:
        """Carry the newest :attr:`observed` queries across steps; an observation whose queries are those.

        A decoding step brings one query, but scores come from a window of them (SnapKV's votes,
        ExpectedAttention's statistics), so the window lives in the layer's state. The newest ``window``
        tokens are protected, so the window's queries belong to held tokens and
        :meth:`Observation.visible` masks them right.
        """
        key = f"{self.name}.queries"
        past = obs.layer.state.get(key)
        queries = obs.queries if past is None else torch.cat([past, obs.queries], 2)
        obs.layer.state[key] = queries = queries[:, :, -self.observed :]
        return Observation(obs.layer, obs.num_layers, queries, obs.scaling, obs.phase, obs.softcap, obs.rope)

    def on_prefill(self, obs: Observation) -> None:
        k = self.layer_budget(obs, obs.valid.sum(-1))
        obs.layer.state["budget"] = k
        if self.decodes:
            self.remember(obs)
        self.evict(obs, k, budget=self.uniform_budget(obs))

    def due(self, obs: Observation) -> tuple[Observation, Tensor] | None:
        """Remember this step's query; when an eviction is due now, the observation to score and the limit.

        Reads the layer's state only, never its tokens, so a backend that keeps tokens elsewhere (the engine's
        pages) loads them only for the steps that evict.
        """
        limit = self.decode_limit(obs)
        if limit is None:
            return None
        recent = self.remember(obs)
        key = f"{self.name}.steps"
        steps = obs.layer.state[key] = obs.layer.state.get(key, 0) + 1
        return (recent, limit) if steps % self.interval == 0 else None

    def attended(self, obs: Observation, steps: int) -> None:
        """Fold the newest ``steps`` queries of ``obs``, one decoding step each, oldest first, into :attr:`token_state`.

        ``on_decode`` calls it for its one query; a backend that keeps tokens elsewhere (the engine's pages) calls it
        once before each :meth:`evict` for the steps since the last one: each query then attends causally (see
        :meth:`Observation.visible`) to exactly the tokens it saw on its step, as nothing was evicted in between.
        Methods without per-token state need nothing."""

    def on_decode(self, obs: Observation) -> None:
        """Every ``interval`` steps, evict down to :meth:`decode_limit`, scored over the remembered queries."""
        self.attended(obs, 1)
        due = self.due(obs)
        if due is not None:
            self.evict(*due)


def scorer_with(base: type[ScoredEviction], mixin: type, prefix: str, **namespace: object) -> type[ScoredEviction]:
    """A dataclass subclass of the scorer ``base`` and a wrapper's ``mixin`` (``adakv(SCORER)``, ``merge(SCORER)``...):
    the mixin comes after the scorer, so the scorer's parameter defaults stand; ``namespace`` sets the wrapper's name
    and hooks. Wrappers cache it, one class per scorer."""
    return dataclass(type(f"{prefix}{base.__name__}", (base, mixin), {"__module__": mixin.__module__, **namespace}))
