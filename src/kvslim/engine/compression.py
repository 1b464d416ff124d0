"""Drive a kvslim method inside the engine with the same method objects as the Hugging Face path.

After a sequence's prefill attention in each layer, its keys, values and queries become a
:class:`LayerKV` and an :class:`Observation`; ``policy.on_prefill`` evicts exactly as it does
under ``kvslim.Cache``; the kept tokens (left-aligned per head, in time order) are then written
into the sequence's blocks, so a compressed sequence holds fewer blocks.

What the engine supports, and why:

* **ragged heads and layers** (AdaKV, auto, PyramidKV, KVzip's request-wide budget, :attr:`Compression.uneven`):
  every (layer, KV head) keeps its own length, in blocks of its own (:mod:`kvslim.engine.head_kv`), so the pool
  holds the bytes the Hugging Face path holds, up to each head's last, partly filled block. Where the engine keeps
  one block table per sequence instead (see ``LLMEngine``'s ``head_blocks``), heads are padded within the
  sequence's blocks and it takes blocks for its *longest* head.
* **probing** (KVzip): the runner feeds each chunk of the prompt, after the repeat instruction, through
  the layers beside the prompt (:meth:`Compression.probe_inputs`); at each layer the probes attend to the
  prompt's full keys and to themselves, and the policy scores from them before the layer is compressed.
  Since a probe at layer ``i`` only reads layers up to ``i``, this is the same pass ``kvslim.Cache`` runs
  after the prefill, and it gives the same scores. KVzip's default budget is shared by every layer and head
  of the request (:attr:`Compression.across_layers`): its layers are held, scored and uncompressed, until the
  last one is, then all are evicted together and only then stored.
* **decode-time eviction**: StreamingLLM's rule needs no scores (sinks + the newest tokens), so its
  window slides by moving a start slot, exactly as its ``on_decode`` would, and blocks the window has
  passed are handed back. Every other decode-time scorer (R-KV, TOVA, H2O, any scorer with ``decode_budget=``
  and ``interval=``) follows the method's own :meth:`ScoredEviction.due` rule (every ``interval`` steps, over
  the newest remembered queries), batched over the step's sequences (:mod:`kvslim.engine.decode_eviction`);
  on a step that evicts, the engine reads the sequences' tokens from their pages, the method selects exactly
  as under ``kvslim.Cache``, and the kept tokens are written back left-aligned so the blocks past them are
  freed. The decode step (eager or a CUDA graph's replay) leaves every layer's queries in
  ``ModelRunner.step_queries``. H2O's scores add up every step's attention: each sequence keeps them on the
  device per (layer, KV head, slot) and adds the steps' queries on the steps that evict, as kvslim.Cache adds
  them on every step. It runs over model-dtype pages, with one evictor, and one completion per request (a fork
  shares blocks the compaction would overwrite).
* **scorers** (SnapKV, KeyDiff, LagKV, ExpectedAttention, knorm, ..., ``adakv(SCORER)``) run at
  prefill from the sequence's keys, values and queries; ExpectedAttention also gets the runner's RoPE
  frequencies. ``merge(SCORER)`` keeps the scorer's tokens with the evicted values folded into them: still one
  key and value per kept token, so its pages are those of the scorer alone (also quantized, ``merge(snapkv)+kivi4``,
  and while decoding, ``merge(h2o)``, ``merge(snapkv,decode_budget=...)``).
* **storage formats**: quantizers (``kivi2``, ``kivi4``, ``int8``, ``int4``, ``fp8``, ``fp8_e4m3``,
  ``fp8_e5m2``), alone or last in a hybrid after prefill-time evictors (``snapkv+kivi4``), store pages as
  their codes (see :mod:`kvslim.engine.kv_store`); KCache (``kcache``, ``snapkv+kcache``) keeps keys in device pages and
  values in host pages (:mod:`kvslim.engine.offload_kv`), PQCache key codes in device pages and exact
  keys and values in host pages (:mod:`kvslim.engine.pq_kv`). The evictors run here, the storage in
  the store. Quest (``quest``, ``snapkv+quest``) keeps every token in model-dtype pages plus each block's key
  extrema, and each step reads only the selected blocks (:mod:`kvslim.engine.quest_kv`). ThinK (``think``,
  ``snapkv+think``) keeps key pages of the channels each (layer, KV head) keeps beside whole value pages
  (:mod:`kvslim.engine.think_kv`): the channels are chosen here, after the evictors, by the method's own rule, and
  each decode step gathers its queries and new keys to them. It comes last, with no quantizer after it (one key
  width per page), not after KVzip (whose probes read thin keys under ``kvslim.Cache``), and with
  ``prune_decoded`` (the default: decoded keys thin too). A sliding window over a storage
  format (``streaming+kivi4``) is refused.
* **chunked prefill** (``max_num_batched_tokens``, see :mod:`kvslim.engine.scheduler`): chunks are stored
  uncompressed in the sequence's pages, each attending to the earlier ones there; after the last chunk the
  evictor runs once, over the whole prompt's keys and values (the pages, read back as decode-time compression
  reads them, then the last chunk's own) and the newest :attr:`Compression.observed` queries, kept across
  chunks. Every scorer looks only at that many newest queries (``ScoredEviction.observed``, the contract
  decode-time compression already relies on), and KVzip's probes attend to the whole prompt at each layer
  during the last chunk, so the kept tokens are those of an unchunked prefill. StreamingLLM also evicts after
  the last chunk: dropping as it goes would change what the later prompt tokens attend to. Quantized, offloaded
  and thin-key (ThinK) stores are not chunked (a chunk would attend to dequantized or pruned keys): their prompts
  run whole.
* **batched prefill** (``ModelRunner.prefill_batch``): fresh prompts admitted together share one forward, and each
  layer of all of them is compressed in one call (:meth:`Compression.compress_packed`), laid out as ``kvslim.Cache``
  lays out a left-padded batch (:class:`PackedPrompts`), so each prompt keeps what it keeps alone. A decode-time
  evictor's layer states (budgets, remembered queries, H2O's scores) are then split per prompt, each exactly what the
  prompt leaves alone (:meth:`Compression.take_packed_states`). Methods that carry a prompt from layer to layer, or
  draw random numbers by the batch's shape, prefill one prompt at a time (:attr:`Compression.batchable`).
* **prefix sharing** is for the full cache, in the model dtype or quantized (a quantizer's packed
  blocks depend only on their own and earlier tokens): what an evictor keeps of a block depends on the
  whole prompt, so evicted blocks are never shared between prompts; offloaded stores (KCache, PQCache)
  do not share either (their blocks are split between device and host), nor do Quest and ThinK (any storage
  format but a quantizer's keeps its blocks to one sequence; ThinK's channels depend on the whole prompt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..cache.layer import LayerKV
from ..cache.segments import DenseSegment
from ..methods import Chain, Method, Observation, ScoredEviction
from ..methods.adakv import AdaptiveHeads
from ..methods.auto import AutoBudget
from ..methods.full import Full
from ..methods.kcache import KCache
from ..methods.kvzip import KVzip, RepeatPrompt, chunk_size
from ..methods.pqcache import PQCache
from ..methods.quantizers import Quantizer
from ..methods.quest import Quest
from ..methods.random_keep import Random
from ..methods.streaming import Streaming
from ..methods.think import ThinK, keep_channels
from .decode_eviction import DecodeEviction


def _parts(policy: Method) -> list[Method]:
    return list(policy.parts) if isinstance(policy, Chain) else [policy]


@dataclass
class PackedPrompts:
    """Where the tokens of prompts packed one after another (``ModelRunner.prefill_batch``) go in one batched layer,
    laid out as ``kvslim.Cache`` lays out a left-padded batch once its first forward dropped the padding.

    There, a prompt's padding is never stored (``LayerKV.select`` of the attention mask's real columns): each row
    holds its own tokens left-aligned in a :class:`DenseSegment` (ragged rows, no padding), ``state["prompt"]`` is
    each prompt's real length (the budgets' base), and scorers skip what ``valid`` marks as not held and count time by
    rank (sinks, windows). The queries stay left-padded, so the newest ones of every prompt are the last columns (the
    observation window); a padding query's attention is masked whole (no votes) and ExpectedAttention weighs it 0.
    Built here directly from the packed rows, with the same layout, so the evictor keeps for each prompt the tokens
    it keeps for that prompt alone. Prompts of one length need no padding: one whole tail, as alone.
    """

    lengths: list[int]
    #: each prompt's tokens (B,): its layer state's ``prompt`` and ``real``
    real: Tensor
    #: queries kept per prompt: its newest ones (the evictors' observation windows, ``Compression.observed``)
    width: int
    #: (head, token) indices of the packed keys in the ragged rows' order (prompt, head, token); None: one length
    rows: tuple[Tensor, Tensor] | None
    #: (B * width,) packed index of each prompt's newest ``width`` queries, left-padded with its first one
    window: Tensor | None

    @classmethod
    def of(cls, lengths: list[int], heads: int, observed: int, upload: Callable[[list[int]], Tensor]
           ) -> "PackedPrompts":
        """``upload``: a host list to the device without waiting for it (``ModelRunner._upload``)."""
        width = min(observed, max(lengths))
        real = upload(lengths)
        if len(set(lengths)) == 1:
            return cls(lengths, real, width, None, None)
        starts = np.cumsum([0, *lengths[:-1]])
        tokens = np.concatenate([np.tile(np.arange(s, s + n), heads) for s, n in zip(starts, lengths)])
        head = np.concatenate([np.repeat(np.arange(heads), n) for n in lengths])
        window = np.concatenate([s + np.maximum(np.arange(n - width, n), 0) for s, n in zip(starts, lengths)])
        return cls(lengths, real, width, (upload(head.tolist()), upload(tokens.tolist())), upload(window.tolist()))

    def layer(self, index: int, keys: Tensor, values: Tensor) -> LayerKV:
        """Layer ``index`` of packed keys/values (H,N,D): every prompt's tokens, one row per (prompt, head)."""
        if self.rows is None:
            return Compression._layer(index, self._split(keys), self._split(values))
        layer = LayerKV(index)
        counts = (max(self.lengths), len(self.rows[0]), False)
        held = self.real[:, None].expand(-1, keys.shape[0])
        layer.replace([DenseSegment(keys[self.rows], values[self.rows], held, counts)])
        layer.state["prompt"] = layer.state["real"] = self.real
        return layer

    def queries(self, queries: Tensor) -> Tensor:
        """Each prompt's newest ``width`` queries (B,Hq,width,D) of the packed ones (Hq,N,D)."""
        if self.window is None:
            return self._split(queries)[:, :, -self.width:]
        return queries[:, self.window].view(len(queries), len(self.lengths), self.width, -1).transpose(0, 1)

    def _split(self, x: Tensor) -> Tensor:
        """(heads, B * n, D) packed rows of prompts of one length n -> (B, heads, n, D)."""
        return x.view(x.shape[0], len(self.lengths), -1, x.shape[-1]).transpose(0, 1)


class Compression:
    """One policy, checked once for what the engine can do, then applied per sequence and layer."""

    def __init__(self, policy: Method, num_layers: int, scaling: float, rope: Tensor | None = None,
                 repeat: RepeatPrompt | None = None):
        self.policy, self.num_layers, self.scaling, self.rope = policy, num_layers, scaling, rope
        #: KVzip's reconstruction instructions in the model's tokens, empty without a tokenizer
        self.repeat = repeat or RepeatPrompt()
        self.states: list[dict] = []  # per layer, the last prefill's method state (see take_states)
        #: after a batched prefill (:meth:`compress_packed`), its prompts' lengths and, for a method with per-token
        #: state, each layer's kept lengths (B, H): how :meth:`take_packed_states` splits :attr:`states` per prompt
        self.packed_lengths: list[int] = []
        self.packed_kept: list[Tensor] = []
        self.channels: list[Tensor] = []  # per layer, the last prefill's ThinK channels (see take_channels)
        unpruned = lambda p: isinstance(p, Full) or isinstance(p, ThinK) and p.ratio == 0  # noqa: E731
        parts = [p for p in _parts(policy) if not unpruned(p)]
        #: the storage format, kept by the KV store (see ``make_store``); the evictors before it run here
        stores = (Quantizer, KCache, PQCache, Quest, ThinK)
        self.storage: Method | None = parts.pop() if parts and isinstance(parts[-1], stores) else None
        self.quantizer = self.storage if isinstance(self.storage, Quantizer) else None
        #: ThinK: chooses each layer's key channels here after the evictors, its store keeps the keys thin
        self.thin = self.storage if isinstance(self.storage, ThinK) else None
        self._check_thin(policy, parts)
        self.evict: Method | None = None if not parts else parts[0] if len(parts) == 1 else Chain(parts)
        #: whether stored blocks depend only on their own and earlier tokens (prefix sharing, KV tiers)
        self.shares_prefix = self.evict is None and (self.storage is None or self.quantizer is not None)
        slides = isinstance(self.evict, Streaming) and self.evict.decode_budget is None and self.evict.interval == 1
        self.window = self.evict if slides else None
        if self.window is not None and self.storage is not None:
            raise ValueError(f"policy {policy.spec}: the engine slides StreamingLLM's window over model-dtype pages only; "
                             f"use streaming or {self.storage.name} alone here, or the hybrid through kvslim.Cache")
        #: the evictor that compresses while decoding (rescored from pages every ``interval`` steps), or None
        self.decoding = self._decoding(policy, parts) if self.window is None else None
        #: runs :attr:`decoding` for every sequence of a decode step
        self.decode_eviction = None if self.decoding is None else DecodeEviction(self.decoding, num_layers, scaling, rope)
        #: a layer's budget depends on every layer's scores (KVzip's ``pair`` level): :meth:`__call__` holds the
        #: layers until the last one, :meth:`held_layers` gives them all back compressed
        self.across_layers = any(isinstance(p, KVzip) and p.across_layers for p in parts)
        self.ragged_heads = self.across_layers or any(isinstance(p, (AdaptiveHeads, AutoBudget)) for p in parts)
        #: (layer, KV head)s keep different numbers of tokens (per-head or per-layer budgets, PyramidKV's included)
        self.uneven = self.ragged_heads or self.evict is not None and len(
            {self.evict.planned_tokens(1024, i, num_layers) for i in range(num_layers)}) > 1
        self._held: list[LayerKV] = []
        #: budgets weighed over every KV head of a layer and every layer of a request (auto): one process only
        self.whole_request = any(isinstance(p, AutoBudget) for p in parts)
        other = [p.name for p in parts if not isinstance(p, ScoredEviction)]
        if other:
            raise ValueError(
                f"policy {policy.spec}: {', '.join(other)} re-stores tokens in its own format; the engine's pages hold "
                "keys and values in the model dtype, as kivi/int/fp8 codes or with thin keys (think), so only eviction "
                f"methods and a last storage format run here (use kvslim.Cache for {', '.join(other)})"
            )
        #: the newest prompt queries the evictors (and ThinK) score with (their observation windows): all a chunked
        #: prefill keeps of its earlier chunks' queries
        windows = [p.observed for p in parts if isinstance(p, ScoredEviction)]
        self.observed = max(windows + ([self.thin.window] if self.thin is not None else []), default=1)
        #: whether the runner must hand each prefill to :meth:`__call__` (an evictor or ThinK acts on it)
        self.acts = self.evict is not None or self.thin is not None
        #: whether several prompts may be prefilled in one forward (``ModelRunner.prefill_batch``), their layers
        #: compressed together (:meth:`compress_packed`): nothing here or in the method may carry one prompt's state
        #: from a layer to the next (auto's ledger, KVzip's probes and held layers, ThinK's channels), nor draw random
        #: numbers by the shape of what it gets, which a batch pads to its longest row (``random``'s scores; PQCache's
        #: k-means initialisation, over a prompt's kept keys). Decode-time compression's states are split per prompt
        #: after the batch (:meth:`take_packed_states`)
        self.batchable = not (self.whole_request or self.policy.probes or self.across_layers or self.thin is not None
                              or any(isinstance(p, Random) for p in parts) or isinstance(self.storage, PQCache))
        #: whether a prompt may be prefilled in chunks with the same result: chunks are stored, then read back by the
        #: next chunks and by the evictor, exactly only in the model dtype (quantized or offloaded pages would give
        #: back other keys than the ones an unchunked prefill attends to and scores)
        self.chunkable = self.storage is None

    def _check_thin(self, policy: Method, parts: list[Method]) -> None:
        """ThinK runs last (after evictors that choose at the prefill, with no storage format after it) and keeps
        decoded keys thin: the key pages have one width."""
        if any(isinstance(p, ThinK) for p in parts):  # a ThinK that is not the last part
            if self.storage is not None:
                raise ValueError(f"policy {policy.spec}: the engine's key pages hold either thin model-dtype keys (think) "
                                 f"or {self.storage.name}'s codes, not both; use think last (e.g. snapkv+think) or "
                                 f"{self.storage.name} here, or the hybrid through kvslim.Cache")
            raise ValueError(f"policy {policy.spec}: think prunes the channels of the keys the evictors keep, so it comes "
                             "last here (e.g. snapkv+think), or use the hybrid through kvslim.Cache")
        if self.thin is not None and policy.probes:
            raise ValueError(f"policy {policy.spec}: under kvslim.Cache ThinK prunes the prompt's keys before KVzip's "
                             "probes read them, which the engine's probes (run beside the prefill) cannot; use think "
                             "after a prefill-time evictor here (e.g. snapkv+think), or the hybrid through kvslim.Cache")
        if self.thin is not None and not self.thin.prune_decoded:
            raise ValueError(f"policy {policy.spec}: prune_decoded=false keeps decoded keys whole, which the engine's "
                             "fixed-width key pages cannot hold; use think (decoded keys kept thin too) here, or "
                             "kvslim.Cache")

    def _decoding(self, policy: Method, parts: list[Method]) -> ScoredEviction | None:
        decoding = [p for p in parts if isinstance(p, ScoredEviction) and p.decodes]
        if not decoding:
            return None
        method = decoding[0]
        if type(method).on_decode is not ScoredEviction.on_decode:
            raise ValueError(
                f"policy {policy.spec}: {method.name} decodes by its own rule (on_decode), which the paged engine's "
                "batched decode-time eviction does not run; use it through kvslim.Cache, or use e.g. "
                "h2o/rkv/tova/snapkv(decode_budget=...) here"
            )
        if len(parts) > 1 or self.storage is not None:
            raise ValueError(
                f"policy {policy.spec}: the engine compresses while decoding with one evictor over model-dtype pages; "
                f"use {method.name} alone here, or the hybrid through kvslim.Cache"
            )
        return method

    def take_channels(self) -> list[Tensor]:
        """Each layer's ThinK channels (H, D') after the last prefill: the sequence's store row keeps them."""
        channels, self.channels = self.channels, []
        return channels

    def take_states(self, appended: int = 0) -> list[dict]:
        """Each layer's method state after the last prefill (budget, remembered queries): a sequence keeps it for
        decode-time compression. ``appended`` tokens run uncompressed after the compressed ones (a suffix) widen
        the budget, as ``kvslim.Cache.appended`` does, so the first decoding step does not squeeze them out."""
        states, self.states = self.states, []
        return self._widened(states, appended)

    def take_packed_states(self, appended: list[int]) -> list[list[dict]]:
        """:meth:`take_states` of each prompt of the last batched prefill (:meth:`compress_packed`), ``appended[b]``
        tokens after prompt b's compressed ones: each layer's batched state split per prompt
        (:meth:`DecodeEviction.split`), each exactly the state that prompt's prefill alone leaves."""
        states, lengths, kept = self.states, self.packed_lengths, self.packed_kept
        self.states, self.packed_lengths, self.packed_kept = [], [], []
        counts = torch.stack(kept).cpu() if kept else [None] * len(states)  # (L, B, H): one host read for all layers
        split = self.decode_eviction.split  # type: ignore[union-attr]
        per_layer = [split(state, lengths, layer_kept) for state, layer_kept in zip(states, counts)]
        return [self._widened([layer[b] for layer in per_layer], extra) for b, extra in enumerate(appended)]

    @staticmethod
    def _widened(states: list[dict], appended: int) -> list[dict]:
        if appended:
            for state in states:
                if "budget" in state:
                    state["budget"] = state["budget"] + appended
        return states

    @staticmethod
    def _layer(index: int, keys: Tensor, values: Tensor) -> LayerKV:
        layer = LayerKV(index)
        layer.append(keys, values)
        prompt = torch.full((keys.shape[0],), keys.shape[2], dtype=torch.long, device=keys.device)
        layer.state["prompt"] = layer.state["real"] = prompt
        return layer

    def reserve(self, n_tokens: int, appended: int = 0) -> int:
        """Page slots a sequence of ``n_tokens`` compressed tokens and ``appended`` uncompressed ones after them (a
        suffix) needs right after its prefill (the blocks admission must find)."""
        if appended:
            return self.reserve(n_tokens) + appended
        kept = n_tokens
        if self.evict is not None and not self.ragged_heads:
            planned = max(self.evict.planned_tokens(n_tokens, i, self.num_layers) for i in range(self.num_layers))
            kept = min(n_tokens, int(planned))
        if self.quantizer is None:
            return kept
        unit = self.quantizer.block()  # only whole units older than the residual are in pages
        return max(0, kept - self.quantizer.residual) // unit * unit

    def shareable(self, n_tokens: int) -> int:
        """Leading tokens of an ``n_tokens`` sequence whose stored blocks depend on those tokens alone, so they may
        be shared between prompts (and written to a KV tier): all of them for the model-dtype cache, the packed
        ones for a quantizer (the newest wait in the residual ring), none once an evictor chose by the whole prompt
        or with an offloading store."""
        return self.reserve(n_tokens) if self.shares_prefix else 0

    def probe_inputs(self, tokens: list[int]) -> list[list[int]]:
        """Token ids of the probes a prompt needs (KVzip: the repeat instruction, then each chunk of the prompt)."""
        if not self.policy.probes:
            return []
        return self.repeat.probes(tokens, chunk_size(self.policy))

    def __call__(self, layer_idx: int, queries: Tensor, keys: Tensor, values: Tensor,
                 probes: list[tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
        """Queries (Hq,T,D), keys/values (H,T,D) of one sequence -> kept keys, values (H,T',D) and lengths (H,).

        ``probes``: the queries (Hq,P,D) and keys (H,P,D) of each probe of :meth:`probe_inputs` at this layer.
        With ThinK the kept keys come back thin (H,T',D'), its channels in :attr:`channels`. None under
        :attr:`across_layers`: the layer is held until the last one, then :meth:`held_layers`."""
        layer = self._layer(layer_idx, keys[None], values[None])
        obs = Observation(layer, self.num_layers, queries[None], self.scaling, "prefill", rope=self.rope)
        if self.evict is None:
            return self._thin(obs, keys, values, torch.full((keys.shape[0],), keys.shape[1], device=keys.device))
        self.evict.on_prefill(obs)
        if probes:
            for probe_queries, probe_keys in probes:
                real = torch.ones(1, probe_keys.shape[1], dtype=torch.bool, device=keys.device)
                self.evict.on_probe(Observation(layer, self.num_layers, probe_queries[None], self.scaling, "probe",
                                                rope=self.rope), probe_keys[None], real)
            self.evict.on_probed(Observation(layer, self.num_layers, queries[None], self.scaling, "prefill",
                                             rope=self.rope))
        if self.decoding is not None:
            self.states = self.states[:layer_idx] + [layer.state]
        if self.across_layers and probes:
            self._held = [*self._held[:layer_idx], layer]
            return None
        kept_k, kept_v, lens = (t[0] for t in self._kept(layer, keys.dtype))
        obs = Observation(layer, self.num_layers, queries[None], self.scaling, "prefill", rope=self.rope)
        return self._thin(obs, kept_k, kept_v, lens)

    def packed(self, lengths: list[int], heads: int, upload: Callable[[list[int]], Tensor]) -> PackedPrompts:
        """The layout :meth:`compress_packed` reads prompts of these lengths in (``heads`` KV heads), built once for
        every layer of a batched prefill."""
        return PackedPrompts.of(lengths, heads, self.observed, upload)

    def compress_packed(self, layer_idx: int, queries: Tensor, keys: Tensor, values: Tensor, prompts: PackedPrompts
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`__call__` of several prompts at once (:attr:`batchable` policies): packed queries (Hq,N,D), keys
        and values (H,N,D) of the prompts of ``prompts`` -> kept keys, values (B,H,T',D) and lengths (B,H); prompt b's
        head h keeps its first ``lengths[b, h]`` (T' is the most any row keeps).

        Why: a prefill is host-bound, and the evictor's few hundred operations per call then cost more than the
        layer's own math, which the prompts already share; one call for all of them pays those once per layer."""
        layer = prompts.layer(layer_idx, keys, values)
        obs = Observation(layer, self.num_layers, prompts.queries(queries), self.scaling, "prefill", rope=self.rope)
        self.evict.on_prefill(obs)  # type: ignore[union-attr]
        kept = self._kept(layer, keys.dtype)
        if self.decoding is not None:  # split per prompt by take_packed_states
            self.states, self.packed_lengths = self.states[:layer_idx] + [layer.state], prompts.lengths
            if self.decoding.token_state:
                self.packed_kept = self.packed_kept[:layer_idx] + [kept[2]]
        return kept

    def _thin(self, obs: Observation, keys: Tensor, values: Tensor, lens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """With ThinK, choose the layer's channels from what the evictors kept (as ``ThinK.on_prefill`` does after
        them under ``kvslim.Cache``) and keep only those of ``keys`` (H,T,D)."""
        if self.thin is None:
            return keys, values, lens
        channels = self.thin.channels(obs)[0]  # (H, D')
        self.channels = self.channels[: obs.layer_idx] + [channels]
        return keep_channels(keys[None], channels[None])[0], values, lens

    @staticmethod
    def _kept(layer: LayerKV, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Kept keys, values (B,H,T',D) and lengths (B,H) of an evicted layer."""
        kept_k, kept_v, valid = layer.dense(dtype)
        return kept_k, kept_v, valid.sum(-1)

    def held_layers(self, dtype: torch.dtype) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Every layer :meth:`__call__` held (:attr:`across_layers`), compressed now that the last one was scored:
        kept keys, values (H,T',D) and lengths (H,) per layer."""
        held, self._held = self._held, []
        if len(held) != self.num_layers:
            raise RuntimeError(f"{self.policy.spec}: {len(held)} of {self.num_layers} layers were scored before storing")
        return [tuple(t[0] for t in self._kept(layer, dtype)) for layer in held]  # type: ignore[misc]

    def start_window(self, seq_len: int, appended: int = 0) -> tuple[int, int] | None:
        """(sinks, budget) of a sliding window for a prefill of ``seq_len`` compressed tokens and ``appended``
        uncompressed ones after them, or None."""
        if self.window is None:
            return None
        # as its decode_limit: what the prefill kept, widened by the appended tokens, and at least ``budget`` (a
        # prompt shorter than it grows up to it)
        budget = max(int(self.window.tokens_for(seq_len)) + appended, self.window.budget or 0)
        return min(self.window.sinks, budget), budget
