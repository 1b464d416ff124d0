"""KVzip: query-agnostic scores from context reconstruction: keep what the model reads to repeat the context.

Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"
(arXiv:2505.23416), following the authors' code (github.com/snu-mllab/KVzip, ``attention/score.py``,
``model/wrapper.py``) and kvpress's ``KVzipPress``. After the prefill the model is asked to repeat the
context, chunk by chunk: chunk ``c`` (``chunk`` tokens) is teacher-forced after an instruction
(:class:`RepeatPrompt`: "Repeat the previous context exactly." for the first chunk, "Repeat the part of the
previous context exactly, starting with" plus the previous chunk's last 8 tokens for the others) and the chat
template's assistant opening, one forward per chunk on top of the cache. A KV pair the reconstruction attends to
is one the context cannot be rebuilt without, whatever question comes later.

Scoring, as the authors do it: a token of chunk ``c`` is scored only by chunk ``c``'s reconstruction, with the
largest attention any of its queries, in any query head of its KV head's group, pays it, where the softmax runs
over the ``sinks`` first tokens, chunk ``c``'s own tokens and the reconstruction tokens (causally), not over
the whole context: a chunk's tokens compete with each other and with the copy, not with the rest of the
context. The probe tokens are never stored (:meth:`kvslim.Cache.probing`). Cost: one more forward over the
context plus the instructions, about twice the prefill, counted in the time to first token.

Budget (``level``, the authors' ``--level``): ``pair`` (their default, and kvpress's ``layerwise=False``) keeps
the best ``keep`` share of all (layer, KV head, token) scores of the request at once, so layers and heads hold
different lengths (ragged, as AdaKV's) and the request's total is the fixed budget's; ``pair-uniform`` keeps the
same number in every layer and head. The first ``sinks`` tokens are always kept (kvpress's ``n_sink=4``; the
authors keep the whole system prompt, which kvslim cannot tell from the context). Under ``pair`` a layer can
only evict once every layer is scored: :class:`kvslim.Cache` reaches that when probing ends, the engine holds
the request's layers until its last one (:mod:`kvslim.engine.compression`). The mean kept share is ``keep``
either way, but the engine sizes a sequence's pages by its longest (layer, head), which under ``pair`` can hold
nearly all of the prompt (Qwen2.5-Coder-0.5B, RULER 1k, keep 0.25: one head kept 855 of 864 tokens), so there
``pair`` saves almost no pages and ``pair-uniform`` saves ``keep``; :class:`kvslim.Cache` stores every head's own
length.

The pass needs the model, so it is driven from outside the cache: :func:`reconstruct` after the
prefill (``kvslim.generate``/``generate_ids`` call it); a cache that is decoded without it refuses.
The engine runs the same probes beside the prompt, layer by layer. ``adakv(kvzip)``: each layer's total comes
from the request-wide selection, AdaKV's rule spreads it over the layer's heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from ..cache.segments import grouped_logits
from ..hf_compat import cache_arg
from .base import Observation, ScoredEviction, keep_top
from .registry import Chain, register

#: the instruction before the first chunk of the repeated context (the authors' wording)
REPEAT_PROMPT = "\n\nRepeat the previous context exactly."
#: the instruction before every later chunk, followed by the end of the chunk before it (the authors' wording)
CONTINUE_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
#: tokens of the previous chunk quoted after :data:`CONTINUE_PROMPT` (the authors' ``prev_postfix_size``)
OVERLAP = 8
#: the budget levels: the authors' ``pair`` (one budget over every layer and head) and ``pair-uniform``
LEVELS = ("pair", "pair-uniform")


@dataclass(frozen=True)
class RepeatPrompt:
    """KVzip's reconstruction instruction in a model's tokens (empty without a tokenizer: the copy follows the
    context directly)."""

    first: tuple[int, ...] = ()  # :data:`REPEAT_PROMPT`
    later: tuple[int, ...] = ()  # :data:`CONTINUE_PROMPT`
    suffix: tuple[int, ...] = ()  # the chat template's end of the user turn and start of the assistant's

    def probes(self, tokens: Sequence[int], chunk: int) -> list[list[int]]:
        """Token ids of each chunk's reconstruction probe for a context of ``tokens``."""
        pieces = [list(tokens[start : start + chunk]) for start in range(0, len(tokens), chunk)]
        return [list(self.first if i == 0 else self.later + tuple(pieces[i - 1][-OVERLAP:])) + list(self.suffix) + piece
                for i, piece in enumerate(pieces)]


def repeat_prompt(tokenizer: Any) -> RepeatPrompt:
    """The instructions in ``tokenizer``'s tokens, and the chat template's assistant opening that follows them (as
    kvpress reads it off the template: a dummy user turn split at a marker); ``"\\n"`` without a chat template."""
    def encode(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    suffix = "\n"
    if getattr(tokenizer, "chat_template", None):
        marker = "\n" + "#" * 13
        text = tokenizer.apply_chat_template([{"role": "user", "content": "dummy context" + marker}],
                                             add_generation_prompt=True, tokenize=False, enable_thinking=False)
        suffix = text.split(marker)[1]
    return RepeatPrompt(encode(REPEAT_PROMPT), encode(CONTINUE_PROMPT), encode(suffix))


@register
@dataclass
class KVzip(ScoredEviction):
    """Max attention from a chunked context-reconstruction pass; evicts when the pass ends."""

    chunk: int = 2048
    sinks: int = 4
    level: str = "pair"
    #: under ``pair``: the observations of the layers probed so far in this request, evicted with the last one
    scored: list[Observation] = field(default_factory=list, init=False, repr=False, compare=False)
    name = "kvzip"
    summary = ("query-agnostic: max attention each token gets while the model repeats the context chunk by chunk "
               "(2nd pass); one budget over all layers and heads")
    paper = "Kim et al. 2025, KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction, arXiv:2505.23416"
    probes = True

    def validate(self) -> None:
        super().validate()
        if self.chunk < 1:
            raise ValueError(f"{self.name}: chunk={self.chunk} must be >= 1 (context tokens reconstructed per forward)")
        if self.level not in LEVELS:
            raise ValueError(f"{self.name}: level={self.level!r} must be one of {', '.join(LEVELS)} (pair: one budget "
                             "over all layers and heads; pair-uniform: the same budget in every layer and head)")
        if self.decode_budget is not None or self.interval != 1:
            raise ValueError(f"{self.name} scores the prompt by reconstructing it, which decoded tokens are not: "
                             "decode_budget/interval do not apply; use e.g. expected_attention for decode-time budgets")

    @property
    def across_layers(self) -> bool:
        """Whether a layer's budget depends on the other layers' scores (it evicts once all are probed)."""
        return self.level == "pair"

    def on_prefill(self, obs: Observation) -> None:
        """Set the budget; scores come from the reconstruction, so nothing is evicted yet."""
        budget = obs.layer.state["budget"] = self.layer_budget(obs, obs.valid.sum(-1))
        obs.layer.state["kvzip"] = None  # new tokens: scores from an earlier pass no longer fit the layout
        obs.layer.state["kvzip.chunks"] = 0
        uniform = self.uniform_budget(obs)  # known on the host: no read of the device
        pending = obs.layer.seen > uniform if uniform is not None else bool((obs.valid.sum(-1) > budget).any())
        obs.layer.state["kvzip.pending"] = pending

    def on_probe(self, obs: Observation, keys: Tensor, real: Tensor) -> None:
        """Score the chunk this probe reconstructs (probes come in chunk order)."""
        valid = obs.valid
        index = obs.layer.state["kvzip.chunks"]
        obs.layer.state["kvzip.chunks"] = index + 1
        rank = obs.time_rank()[0]
        in_chunk = valid & (rank >= index * self.chunk) & (rank < (index + 1) * self.chunk)
        counted = in_chunk | (valid & (rank < self.sinks))  # (B,H,T): the keys the score's softmax runs over
        score = counted_attention(obs.queries, obs.keys, keys, real, counted, obs.scaling,
                                  min(counted.shape[-1], self.chunk + self.sinks))
        past = obs.layer.state.get("kvzip")
        past = torch.zeros_like(score) if past is None else past
        obs.layer.state["kvzip"] = torch.where(in_chunk, score, past)

    def on_probed(self, obs: Observation) -> None:
        if obs.layer.state.get("kvzip") is None:
            return
        if not self.across_layers:
            self._evict_probed(obs, obs.layer.state["budget"])
            return
        self.scored = [*self.scored[: obs.layer_idx], obs]
        if obs.layer_idx == obs.num_layers - 1:
            scored, self.scored = self.scored, []
            for layer_obs, k in zip(scored, self.request_budgets(scored)):
                layer_obs.layer.state["budget"] = k
                self._evict_probed(layer_obs, k)

    def request_budgets(self, scored: list[Observation]) -> list[Tensor]:
        """Each layer's kept tokens per (sequence, KV head) when the request's best scores over every layer and
        head fill the sum of the layers' budgets (the authors' ``pair`` level)."""
        ranked = [self.ranked(o, self.score(o).float()) for o in scored]
        total = sum(o.layer.state["budget"].sum(-1) for o in scored)
        flat = torch.cat([r.flatten(1) for r in ranked], 1)
        keep = keep_top(flat[:, None], total[:, None])[:, 0]
        sizes = [r[0].numel() for r in ranked]
        return [part.view(r.shape).sum(-1) for part, r in zip(keep.split(sizes, 1), ranked)]

    def _evict_probed(self, obs: Observation, k: Tensor) -> None:
        self.evict(obs, k, budget=None if self.across_layers else self.uniform_budget(obs))
        obs.layer.state["kvzip"] = None
        obs.layer.state["kvzip.pending"] = False

    def score(self, obs: Observation) -> Tensor:
        return obs.layer.state["kvzip"]

    def on_decode(self, obs: Observation) -> None:
        if obs.layer.state.get("kvzip.pending"):
            raise ValueError("kvzip evicts after its reconstruction pass, which did not run: call "
                             "kvslim.methods.kvzip.reconstruct(model, cache, ids) after the prefill "
                             "(kvslim.generate does), or use a method that scores during the prefill")


def counted_attention(queries: Tensor, held: Tensor, own: Tensor, real: Tensor, counted: Tensor, scaling: float,
                      width: int) -> Tensor:
    """(B,H,T) the largest attention any real probe query of a KV head's group pays each ``counted`` held key, its
    softmax over the counted held keys and, causally, the probe's own real keys; 0 for the other held keys.

    ``queries`` (B,Hq,P,D) and ``own`` keys (B,H,P,D) of a probe left-padded where ``real`` (B,P) is False; ``held``
    keys (B,H,T,D); ``counted`` (B,H,T) holds at most ``width`` keys per row. Why this shape of computation: the
    softmax needs only the counted keys, a small share of what a long context holds, so they are gathered first
    (in column order) and the logits cover them and the probe alone; each KV head's query group is one matrix
    (no keys repeated per query head). A padding query sees no held key and only its own key, so it pays the held
    keys exactly 0 without a pass to zero it. Float32 logits and softmax, as the plain masked softmax over every
    held key would give, up to rounding.
    """
    batch, heads, length, dim = held.shape
    q_len = queries.shape[2]
    group = queries.shape[1] // heads
    columns = (~counted).to(torch.uint8).argsort(dim=-1, stable=True)[..., :width]  # counted first, in column order
    picked = counted.gather(-1, columns)  # (B,H,W): False where a row counts fewer than ``width``
    keys = torch.cat([held.gather(2, columns[..., None].expand(-1, -1, -1, dim)), own], 2)
    logits = grouped_logits(queries, keys, scaling).view(batch, heads, group, q_len, -1)
    eye = torch.eye(q_len, dtype=torch.bool, device=real.device)
    causal = torch.ones_like(eye).tril() & (real[:, None, :] | eye)  # (B,P,P): a padding query sees itself only
    allowed = torch.cat([picked[:, :, None, :] & real[:, None, :, None],
                         causal[:, None].expand(-1, heads, -1, -1)], -1)  # (B,H,P,W+P)
    probs = logits.masked_fill_(~allowed[:, :, None], float("-inf")).softmax(-1)[..., :width]
    return held.new_zeros(batch, heads, length, dtype=torch.float32).scatter_(-1, columns, probs.amax((2, 3)))


def chunk_size(policy: Any) -> int:
    """Context tokens per probe of a probing policy (the smallest kvzip part's ``chunk``)."""
    parts = policy.parts if isinstance(policy, Chain) else [policy]
    sizes = [p.chunk for p in parts if isinstance(p, KVzip)]
    if not sizes:
        raise ValueError(f"policy {policy.spec} does not probe: reconstruct() is for kvzip (or adakv(kvzip))")
    return min(sizes)


@torch.inference_mode()
def reconstruct(model: Any, cache: Any, ids: Tensor, mask: Tensor | None = None,
                prompt: RepeatPrompt | None = None) -> None:
    """KVzip's scoring pass over a prefilled ``kvslim.Cache``, then its eviction.

    ``ids`` (B, T) is the context the cache was prefilled with (left-padded where ``mask`` (B, T) is 0);
    ``prompt`` the instructions in the model's tokens (:func:`repeat_prompt`; None: the copy simply follows the
    context). Every row is cut into chunks from its own first token, so a row's scores do not depend on the batch
    it is in; chunk ``c`` of every row goes in one probe forward (left-padded), at the positions that follow its
    row's context. Leaving the probe block evicts.
    """
    chunk = chunk_size(cache.policy)
    prompt = prompt or RepeatPrompt()
    mask = torch.ones_like(ids) if mask is None else mask.to(ids.device)
    rows = [prompt.probes(row[keep.bool()].tolist(), chunk) for row, keep in zip(ids, mask)]
    context = mask.sum(-1, keepdim=True)
    seen = torch.ones(len(rows), cache.get_seq_length(), dtype=torch.long, device=ids.device)
    with cache.probing():
        for index in range(max(len(r) for r in rows)):
            pieces = [r[index] if index < len(r) else [] for r in rows]
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
