"""``kvslim.Cache``: a transformers ``Cache`` whose layers hold only what the policy keeps.

Works in ``model.generate(..., cache=cache)`` (``past_key_values=`` before transformers 5.24) and in
hand-written forward loops, with sdpa and eager attention. The prompt is attended in full (the model's
own attention), then the policy compresses; decoding attends over the compressed storage. RoPE
positions stay true because keys are cached after rotation and ``get_seq_length`` counts tokens
*seen*, not tokens kept.

Sliding-window layers (Mistral, Phi-3, Gemma 2/3; see :mod:`.window`) keep the model's semantics:
every attention sees only the layer's window, and after each forward the layer drops the tokens no
later query can see, holding at most ``W - 1`` tokens as transformers' own cache does. The method
then acts within what is left: its budget is a share of what the full cache holds in that layer
(``keep=0.5`` keeps half the window once the prompt fills it; ``budget=N`` keeps ``min(N, W - 1)``),
and quantizers pack the window's tokens as they would any others.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor
from transformers.cache_utils import Cache as HFCache
from transformers.cache_utils import CacheLayerMixin

from ..shape import KVShape
from . import attention as routing
from .architecture import SUPPORTED, layer_windows
from .layer import LayerKV
from .buffers import GrowingSegment, StaticSegment
from .quantized import QuantizedSegment
from .segments import DenseSegment, Segment, merge_partials
from .window import SlotTracker

if TYPE_CHECKING:
    from ..methods import Observation


def rope_frequencies(config: Any) -> Tensor | None:
    """RoPE inverse frequencies (rotated dims / 2,) of a transformers config, as its rotary embedding builds them;
    None for a model without RoPE. Scoring methods that project queries to future positions use them."""
    params = getattr(config, "rope_parameters", None)
    if not params or "rope_theta" not in params:
        return None
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope_type](config)[0].float()
    shape = KVShape.from_config(config)
    dim = int(shape.head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


class _Layer(LayerKV, CacheLayerMixin):
    """A kvslim layer that transformers' generic cache code recognises."""

    is_sliding = False  # the mask transformers builds is used for a first prefill only, where it is exact

    def __init__(self, layer_idx: int, window: int | None = None, capacity: int | None = None):
        CacheLayerMixin.__init__(self)
        LayerKV.__init__(self, layer_idx, capacity)
        self.window = window
        self.tracker = SlotTracker(window) if window else None
        self.is_initialized = True

    # -- sliding windows: the slot of every held token follows each change of the layer ---------------
    def valid(self) -> Tensor:
        return torch.cat([seg.valid_mask() for seg in self.segments], 2)

    def append(self, keys: Tensor, values: Tensor) -> None:
        held = self.lengths if self.tracker is not None and self.tracker.slots is not None else None
        super().append(keys, values)
        if held is not None:
            self.tracker.appended(held, self.seen - keys.shape[2], keys.shape[2])  # type: ignore[union-attr]

    def select(self, keep: Tensor, values: Tensor | None = None, width: int | None = None) -> None:
        if self.tracker is not None:
            self.tracker.selected(self.valid(), keep, self.lengths, self.seen)
        super().select(keep, values, width)

    def drop_span(self, first: int, stop: int) -> None:
        if self.tracker is None:
            super().drop_span(first, stop)
            return
        keep = self.valid().clone()  # the recorded slots follow a mask
        keep[..., first:stop] = False
        self.select(keep, width=int(keep.shape[-1]) - (stop - first))

    def nbytes(self) -> int:
        """Storage plus the recorded slots (see :mod:`.window`): both are device memory this layer holds."""
        return super().nbytes() + self.slot_bytes()

    def slot_bytes(self) -> int:
        """Bytes of the recorded slots, 0 while they are implied; every sequence holds an equal share (one padded
        tensor)."""
        slots = None if self.tracker is None else self.tracker.slots
        return 0 if slots is None else slots.numel() * slots.element_size()

    def in_window(self, q_len: int) -> Tensor | None:
        """(B, H, q, T) columns inside each new query's window; None for a global-attention layer."""
        if self.tracker is None:
            return None
        return self.tracker.allowed(self.valid(), self.lengths, self.seen, q_len)

    def expired(self) -> Tensor | None:
        """(B, H, T) held tokens that no later query can see; None when there are none."""
        if self.tracker is None or self.seen < self.tracker.window:
            return None
        gone = self.tracker.expired(self.valid(), self.lengths, self.seen)
        return gone if bool(gone.any()) else None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to preallocate: storage is created by the first update."""

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise RuntimeError("update kvslim layers through kvslim.Cache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Columns of the mask the model builds (column ``p`` is position ``p``): every position so far; for a
        decoding step in static mode the fixed ``capacity`` instead (as transformers' StaticCache), so a compiled
        step builds a mask of one shape (decoding reads its own mask, never this one)."""
        if self.capacity is not None and query_length == 1:
            return self.capacity, 0
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        _Layer.__init__(self, self.layer_idx, self.window, self.capacity)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("kvslim.Cache supports greedy decoding and sampling, not beam search: use num_beams=1")

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("kvslim.Cache cannot be cropped (evicted tokens are gone): disable assisted decoding")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.empty:
            raise ValueError("kvslim.Cache cannot be expanded after prefill: pass num_return_sequences=1")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise ValueError("kvslim.Cache does not support selecting batch rows (contrastive search)")


class Cache(HFCache):
    """A compressed KV cache for a Hugging Face model, driven by a kvslim method.

    ``kvslim.Cache(kvslim.policy("snapkv", keep=0.25), model.config)``. Building it routes the
    config's attention through kvslim (same math when no kvslim cache is in use). A model whose layers
    are not all softmax attention (see :mod:`.architecture`) is a ValueError.

    ``max_length=N`` is static mode (see :mod:`.buffers`): from the first decoding step, each layer writes new
    tokens into buffers of N tokens per head allocated once, and a step attends over the whole buffer under a mask,
    so its shapes and operations are the same at every step and it makes no host sync: ``torch.compile`` traces a
    step as one graph, and a compiled step counts on the device only (see :meth:`LayerKV.counts_on_device`), so the
    graph has no symbolic inputs and ``mode="reduce-overhead"`` (CUDA graphs) records it once, as for transformers'
    ``StaticCache``. N bounds what decoding holds (the kept prompt plus the new tokens), not the prompt, which is
    read and compressed first. The greedy tokens are those of the default (growing) mode. Decoding past N held
    tokens is a ValueError in eager steps; a compiled step does not check (as ``StaticCache``): size N for the whole
    generation.
    """

    def __init__(self, policy: Any, config: Any, max_length: int | None = None):
        from ..methods import Method, policy as build

        self.policy: Method = policy if isinstance(policy, Method) else build(policy)
        self.config = getattr(config, "config", config)  # a model is accepted too
        windows = layer_windows(self.config)
        if max_length is not None and (max_length < 1 or any(windows)):
            raise ValueError(f"max_length={max_length}: static mode needs a positive token count and a model without "
                             "sliding-window layers; leave max_length=None (growing buffers) for this model")
        self.shape = KVShape.from_config(self.config)
        routing.route(self.config)
        routing.clear_pending()
        self.element_bytes = self.shape.element_bytes  # replaced by the real cache dtype at the first update
        self.rope = rope_frequencies(self.config)
        #: while probing (see :meth:`probing`): each layer's probe keys/values, between its update and its attention
        self._probe: dict[int, tuple[Tensor, Tensor]] | None = None
        self._appending = False
        self._append_real: Tensor | None = None
        super().__init__(layers=[_Layer(i, w, max_length) for i, w in enumerate(windows)])

    @contextmanager
    def probing(self) -> Iterator[None]:
        """Forwards inside this block are probes: they attend to what the cache holds and, causally, to themselves,
        but store nothing; the policy's ``on_probe`` sees each layer's probe queries and keys. Leaving the block
        calls ``on_probed`` for every layer, where a probing method evicts.

        Why: KVzip scores a prefilled context by the attention it receives while the model reads a prompt to
        repeat it (see :mod:`kvslim.methods.kvzip`); that pass must see the whole cache and leave no trace in it.
        Probe positions are the caller's ``position_ids`` (they continue after the context); padding in a probe
        is read off its ``attention_mask`` (a 2-D mask covering the cache's seen tokens and then the probe).
        """
        if self.layers[0].empty:
            raise ValueError("Cache.probing() reads a prefilled cache: run the context through the cache first")
        self._probe = {}
        try:
            yield
        finally:
            self._probe = None
        from ..methods import Observation

        for layer in self.layers:  # no queries: the selection acts on what the probes left in the layer's state
            queries = torch.empty(layer.lengths.shape[0], self.shape.num_heads, 0, self.shape.head_dim,
                                  device=layer.lengths.device)
            self.policy.on_probed(Observation(layer, self.shape.num_layers, queries, 1.0, "prefill", rope=self.rope))

    @contextmanager
    def appended(self, real: Tensor | None = None) -> Iterator[None]:
        """Forwards inside this block add their tokens as they are: the policy does not act on them.

        Why: the query-agnostic protocol (kvpress's pipeline, KVzip, prefix caching, multi-turn chat)
        compresses a context first and only then reads a question from the compressed cache. The question
        must be attended in full and kept, not become part of what the method selects from, and it must not
        vote for what the context keeps. ``real`` (B, q) marks the new columns that hold tokens: a batch of
        questions of different lengths is left-padded, and padding is masked in the forward and dropped from
        storage right after it. Decode-time methods then hold their budget at the kept context plus the
        question, so the question is not squeezed out by the first decoding step.
        """
        if self.layers[0].empty:
            raise ValueError("Cache.appended() adds tokens after a prefill: run the context through the cache first")
        if real is not None and not bool(real.all()) and any(layer.tracker is not None for layer in self.layers):
            raise ValueError("appending a padded batch is not supported on sliding-window layers yet: append "
                             "questions of one length (e.g. batch size 1)")
        self._appending, self._append_real = True, real
        try:
            yield
        finally:
            self._appending, self._append_real = False, None

    # -- the transformers Cache protocol ----------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        """Store the new tokens; the routed attention that follows attends over the whole layer."""
        layer = self.layers[layer_idx]
        if self._probe is not None:
            self._probe[layer_idx] = (key_states, value_states)
            routing.set_pending(self, layer_idx)
            return key_states, value_states
        self.element_bytes = key_states.element_size()
        layer.append(key_states, value_states)
        routing.set_pending(self, layer_idx)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int | Tensor:
        """Tokens seen; inside a compiled static-mode step a device tensor (as transformers' ``StaticCache`` returns),
        so the step reads no host count that changes (see :meth:`LayerKV.counts_on_device`)."""
        layer = self.layers[layer_idx]
        if layer.decode_steps is not None and torch.compiler.is_compiling():
            return layer.decode_steps + layer._seen
        return layer.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:  # type: ignore[override]
        return self.layers[layer_idx].get_mask_sizes(query_length)

    @property
    def is_compileable(self) -> bool:
        return False

    # -- attention, then compression ----------------------------------------------------------------
    def attend(self, layer_idx: int, module: torch.nn.Module, query: Tensor, attention_mask: Tensor | None,
               base: Callable[..., Any], impl: str, kwargs: dict[str, Any]) -> tuple[Tensor, None]:
        """Attention for one layer over what it holds, then let the policy act on it."""
        from ..methods import Observation

        layer: _Layer = self.layers[layer_idx]
        q_len = query.shape[2]
        scaling = kwargs.pop("scaling", None) or getattr(module, "scaling", query.shape[-1] ** -0.5)
        softcap = kwargs.get("softcap")
        if kwargs.get("s_aux") is not None:
            raise ValueError(f"kvslim.Cache serves {SUPPORTED}; this model's attention has learned sinks "
                             "(s_aux, gpt-oss)")
        if self._probe is not None:
            return self._attend_probe(layer, query, attention_mask, scaling, impl), None
        first = layer.fresh  # this forward brought the layer's first tokens: a plain prompt pass
        if first:
            keys, values, _ = layer.dense(query.dtype)
            out = base(module, query, keys, values, attention_mask, scaling=scaling, **kwargs)[0]
            real = routing.key_padding(attention_mask, keys.shape[0], q_len, keys.device)
            layer.state["prompt"] = layer.state["real"] = real.sum(-1)
            if attention_mask is not None and not bool(real.all()):  # batch padding is never stored (no mask: none)
                layer.select(real[:, None, :].expand(keys.shape[:3]))
        else:
            window = layer.in_window(q_len)
            new_real = self._append_real if self._appending else None
            packed = _packed_decode(layer, query, scaling, softcap) if window is None and new_real is None else None
            if packed is not None:
                out = packed
            elif any(type(seg).attend is not Segment.attend for seg in layer.segments):
                if softcap is not None:
                    raise ValueError(f"{self.policy.spec} attends segment by segment, which cannot softcap logits "
                                     "(Gemma 2): use an evicting method or a quantizer")
                out = _attend_by_segment(layer, query, scaling, window, new_real)
            else:  # one attention call over the layer's dense copy: the fast path
                keys, values, valid = layer.dense(query.dtype)
                if q_len == 1 and window is None and new_real is None and layer.whole:
                    allowed = None  # every held token, no mask to build: SDPA's flash kernel may serve it
                else:  # the new tokens are the last q columns of the layout (see LayerKV.select)
                    obs_visible = Observation(layer, self.shape.num_layers, query, scaling, "decode").visible
                    allowed = obs_visible(q_len) if q_len > 1 else valid[:, :, None, :]
                    allowed = _mask_new(allowed if window is None else allowed & window, new_real)
                out = routing.masked_attention(query, keys, values, allowed, scaling, impl, softcap)
            if self._appending:
                _append_as_is(layer, q_len, new_real)
                return out, None
            if q_len > 1:
                layer.state["real"] = layer.state["real"] + q_len
                layer.state["prompt"] = layer.state["prompt"] + q_len
            elif not layer.counts_on_device(q_len):  # else counted in LayerKV.decode_steps (see counts_on_device)
                layer.state["decoded"] = layer.state.get("decoded", 0) + 1
        phase = "prefill" if q_len > 1 or first else "decode"
        rope = self._rope_on(query.device)
        if layer.window is not None:
            self._expire(layer, Observation(layer, self.shape.num_layers, query, scaling, phase, softcap, rope))
        obs = Observation(layer, self.shape.num_layers, query, scaling, phase, softcap, rope)
        (self.policy.on_prefill if phase == "prefill" else self.policy.on_decode)(obs)
        if phase == "prefill":
            layer.settle()
        return out, None

    def _rope_on(self, device: torch.device) -> Tensor | None:
        """The RoPE frequencies on the queries' device (moved once, kept there)."""
        if self.rope is not None and self.rope.device != device:
            self.rope = self.rope.to(device)
        return self.rope

    def _expire(self, layer: _Layer, obs: Observation) -> None:
        """Drop what a sliding-window layer's later queries cannot see, before the method acts on the rest;
        the prompt the method budgets for is what the full cache holds there (at most ``W - 1`` tokens)."""
        gone = layer.expired()
        if gone is not None:
            keep = layer.valid() & ~gone
            self.policy.reflow(obs, keep)
            layer.select(keep)
        layer.state["prompt"] = layer.state["prompt"].clamp(max=layer.window - 1)  # type: ignore[operator]

    def _attend_probe(self, layer: LayerKV, query: Tensor, attention_mask: Tensor | None, scaling: float,
                      impl: str) -> Tensor:
        """A probe's attention over the held tokens then its own (causal, padding hidden); the policy sees it."""
        from ..methods import Observation

        own_keys, own_values = self._probe.pop(layer.layer_idx)  # type: ignore[union-attr]
        keys, values, valid = layer.dense(query.dtype)
        batch, heads, held = valid.shape
        q_len = query.shape[2]
        tail = None if attention_mask is None else attention_mask[..., -q_len:]
        real = routing.key_padding(tail, batch, q_len, query.device)
        own = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril() & real[:, None, :]  # (B, q, q)
        allowed = torch.cat([valid[:, :, None, :].expand(batch, heads, q_len, held),
                             own[:, None].expand(batch, heads, q_len, q_len)], -1)
        out = routing.masked_attention(query, torch.cat([keys, own_keys], 2), torch.cat([values, own_values], 2),
                                       allowed, scaling, impl)
        rope = self._rope_on(query.device)
        obs = Observation(layer, self.shape.num_layers, query, scaling, "probe", rope=rope)
        self.policy.on_probe(obs, own_keys, real)
        return out

    # -- accounting ---------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes actually held by every layer's storage (codes, scales, indices included)."""
        return sum(layer.nbytes() for layer in self.layers)

    def stats(self) -> dict[str, Any]:
        """Tokens kept per layer and KV head (per sequence), bytes held and the ratio to a full cache."""
        per_layer = [layer.lengths.tolist() if layer.segments else [] for layer in self.layers]
        kept = sum(int(layer.lengths.sum()) for layer in self.layers if layer.segments)
        seen = self.tokens_seen()
        full_tokens = sum(self._full_tokens()) * self.shape.num_kv_heads
        full_bytes = full_tokens * 2 * self.shape.head_dim * self.element_bytes
        return {
            "policy": self.policy.spec,
            "tokens_seen": seen,
            "tokens_kept_per_layer_head": per_layer,
            "kept_ratio": kept / full_tokens if full_tokens else 1.0,
            "nbytes": self.nbytes(),
            "device_nbytes": sum(seg.device_nbytes() for layer in self.layers for seg in layer.segments)
            + sum(layer.slot_bytes() for layer in self.layers),
            "host_nbytes": sum(seg.host_nbytes() for layer in self.layers for seg in layer.segments),
            "full_nbytes": full_bytes,
            "bytes_ratio": self.nbytes() / full_bytes if full_bytes else 1.0,
            **self._reconstruction_errors(),
        }

    def _reconstruction_errors(self) -> dict[str, Any]:
        """``reconstruction_error`` per layer where a storage format records one in the layer's state (lowrank)."""
        errors = [layer.state.get("reconstruction_error") for layer in self.layers]
        return {"reconstruction_error": errors} if any(e is not None for e in errors) else {}

    def bytes_per_sequence(self, host: bool = False) -> list[int]:
        """Bytes held for each sequence of the batch (``host``: only those offloaded to host memory, as KCache's
        values; device bytes are the difference)."""
        totals = [0] * self.batch_size_seen
        for layer in self.layers:
            for seg in layer.segments:
                totals = [a + b for a, b in zip(totals, seg.nbytes_per_sequence(host))]
            if not host and totals:
                totals = [a + layer.slot_bytes() // len(totals) for a in totals]
        return totals

    def tokens_per_sequence(self) -> list[int]:
        """Tokens held for each sequence, summed over layers and KV heads."""
        totals = [0] * self.batch_size_seen
        for layer in self.layers:
            if layer.segments:
                totals = [a + b for a, b in zip(totals, layer.lengths.sum(-1).tolist())]
        return totals

    def full_bytes_per_sequence(self) -> list[int]:
        """Bytes a full cache would hold for each sequence's real tokens."""
        per_token = 2 * self.shape.num_kv_heads * self.shape.head_dim * self.element_bytes
        return [n * per_token for n in self._full_tokens()]

    def _full_tokens(self) -> list[int]:
        """Tokens per KV head a full cache holds for each sequence, summed over layers: every real token, or
        at most ``W - 1`` in a sliding-window layer (what transformers' own cache keeps there)."""
        windows = [layer.window for layer in self.layers]
        return [sum(n if w is None else min(n, w - 1) for w in windows) for n in self.tokens_seen()]

    @property
    def batch_size_seen(self) -> int:
        return len(self.tokens_seen())

    def tokens_seen(self) -> list[int]:
        """Real (unpadded) tokens each sequence has passed through the cache."""
        self.layers[0].sync_counts()
        state = self.layers[0].state
        real = state.get("real")
        return [] if real is None else [int(n) + state.get("decoded", 0) for n in real]


def _mask_new(allowed: Tensor, new_real: Tensor | None) -> Tensor:
    """Hide the padding among the newest columns of a (B,H,q,T) mask; ``new_real`` is (B, q) or None."""
    if new_real is None:
        return allowed
    allowed = allowed.clone()
    allowed[..., -new_real.shape[1]:] &= new_real[:, None, None, :].to(allowed.device)
    return allowed


def _append_as_is(layer: LayerKV, q_len: int, new_real: Tensor | None) -> None:
    """Bookkeeping for tokens added by :meth:`Cache.appended`: drop their padding from storage, count them
    as seen (not as prompt: budget shares stay those of the compressed prompt) and widen a decode-time
    budget by them."""
    real = torch.full((layer.lengths.shape[0],), q_len, device=layer.lengths.device) if new_real is None \
        else new_real.to(layer.lengths.device).sum(-1)
    if new_real is not None and not bool(new_real.all()):  # only the newest segment changes
        keys, values, valid = layer.segments[-1].dense()
        keep = valid.clone()
        keep[..., -q_len:] &= new_real[:, None, :].to(keep.device)
        layer.replace(layer.segments[:-1] + [DenseSegment.from_padded(keys, values, keep)])
    layer.state["real"] = layer.state["real"] + real
    if "budget" in layer.state:
        layer.state["budget"] = layer.state["budget"] + real[:, None]


def _packed_decode(layer: LayerKV, query: Tensor, scaling: float, softcap: float | None) -> Tensor | None:
    """A decoding step's attention read straight from packed codes, (B, 1, Hq, Dv); None where it does not apply.

    Why: attending through ``dense()`` dequantizes the layer's whole packed history on every step, more work and
    memory traffic than a full cache's attention, so KIVI decoded slower than the full cache. On a GPU, a layer
    holding one packed segment of integer codes (KIVI, int4/int8) and a full-precision tail is answered by the
    Triton kernel over the codes, the tail's softmax joined to its splits in one normalization
    (:func:`kvslim.kernels.quant_decode.quant_decode_with_tail`: half the small ops of merging two partials). Its
    launch plan is built once per packed segment (they change once per packed block).
    """
    segments = layer.segments
    if not isinstance(segments[0], QuantizedSegment) or query.shape[2] != 1 or softcap is not None:
        return None  # checked first: the common case (a full-precision layer) leaves at once
    if not (query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):  # the interpreter runs it on the CPU
        return None
    if len(segments) > 2 or (len(segments) == 2 and not isinstance(segments[1], (GrowingSegment, StaticSegment))):
        return None
    packed = segments[0]
    plan = getattr(packed, "decode_plan", None)
    if plan is None:
        from ..kernels.quant_decode import plan_decode

        dim = query.shape[-1]
        readable = query.dtype in (torch.bfloat16, torch.float16) and dim >= 16 and not dim & (dim - 1)
        try:
            plan = plan_decode(packed, query.shape[1]) if readable else False
        except ValueError:  # a format the kernel does not read (fp8, odd groups): the dense path serves it
            plan = False
        packed.decode_plan = plan  # type: ignore[attr-defined]
    if plan is False:
        return None
    from ..kernels.quant_decode import quant_decode_partial, quant_decode_with_tail

    if len(segments) == 1:  # everything packed (residual 0): the query's own token too
        out, _ = quant_decode_partial(query[:, :, 0], packed, scaling, plan)
    else:
        keys, values, valid = segments[1].dense()
        whole = isinstance(segments[1], GrowingSegment)  # every column held: no mask
        out = quant_decode_with_tail(query[:, :, 0], packed, scaling, plan, keys, values, None if whole else valid)
    return out.to(query.dtype)[:, None]  # (B, 1, Hq, Dv)


def _attend_by_segment(layer: LayerKV, query: Tensor, scaling: float, window: Tensor | None,
                       new_real: Tensor | None = None) -> Tensor:
    """Attention as the log-sum-exp merge of each segment's partial attention, (B, q, Hq, Dv) like ``base``.

    Used when a segment attends by itself (e.g. reads only some rows from the host), so no dense copy of
    the layer is made. The mask comes from the segments' lengths: each query sees the held tokens up to
    its own time rank (the rule of ``Observation.visible``) and inside its ``window`` (sliding-window
    layers), split along tokens by segment widths.
    """
    q_len = query.shape[2]
    valid = torch.cat([seg.valid_mask() for seg in layer.segments], 2)
    rank = valid.long().cumsum(-1) - 1
    limit = valid.sum(-1, keepdim=True) + torch.arange(q_len, device=valid.device) - q_len  # (B, H, q)
    allowed = valid[:, :, None, :] & (rank[:, :, None, :] <= limit[..., None])
    allowed = _mask_new(allowed if window is None else allowed & window, new_real)
    parts = [seg.attend(query, part, scaling) for seg, part in zip(layer.segments, allowed.split(layer.widths(), -1))]
    out, _ = merge_partials(parts)
    return out.to(query.dtype).transpose(1, 2).contiguous()
