"""A direct Llama-family decoder (Llama, Qwen2, Qwen3, Mistral) over a paged KV pool.

Weights are the Hugging Face model's own tensors (no copy), so the engine and ``model.generate``
run the same numbers. Prefill runs torch SDPA over each prompt whole (the method needs those keys and
queries anyway); each layer's keys and values then go through the compression hook straight into the
sequence's blocks, so a long prompt never sits in the pool in full. Fresh prompts admitted together share
one forward (:meth:`ModelRunner.prefill_batch`, tokens packed, their uncompressed suffixes in one more); the
others (a cached prefix, a chunk) run one at a time (:meth:`ModelRunner.prefill`). Decode runs every running sequence in one batch
over the pool with paged attention.

The pool is a :mod:`kvslim.engine.kv_store` store: model-dtype pages, or quantized pages plus a
full-precision residual ring. A slot is ``block * block_size + offset``. Heads of one sequence may
hold different numbers of slots (ragged methods); a slot's position in the table, not its RoPE
position, orders it: keys are stored after rotation, so positions stay true whatever was evicted.

On CUDA the decode step replays CUDA graphs (:class:`DecodeGraphs`) unless ``enforce_eager`` is set.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import fused_ops_ref
from ..methods import Method
from .fused_weights import stack_linears
from .head_kv import HeadKV, HeadStep
from .kv_store import QuantStep, make_store
from .sequence import Sequence
from .think_kv import ThinKV, ThinStep

SUPPORTED_MODELS = ("llama", "qwen2", "mistral", "qwen3")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
#: batch sizes decode graphs are captured for (a batch runs in the smallest that holds it; larger ones run eagerly)
GRAPH_BATCHES = (1, 2, 4, 8, *range(16, 513, 16))

#: (layer, queries (Hq,T,D), keys (H,T,D), values (H,T,D), probes) -> kept keys, values (H,T',D) and lengths (H,);
#: ``probes`` holds each probe's queries (Hq,P,D) and keys (H,P,D) at that layer (see ``Compression.probe_inputs``);
#: None while a budget across layers holds the layers (``Compression.across_layers``, then ``held_layers``)
CompressHook = Any


@dataclass
class DecodeBatch:
    """Everything one batched decode step reads, built once per step on the device."""

    tokens: Tensor  # (B,)
    positions: Tensor  # (B,) RoPE positions (tokens seen so far)
    block_tables: Tensor  # (B, M) int32, -1 where no block
    lens: Tensor  # (B, L, H) page slots held per layer and KV head before this step
    starts: Tensor  # (B,) sliding-window start slot (0 when none)
    sinks: Tensor  # (B,) slots always visible before the window
    kv: Any  # what the store reads this step (its ``prepare``)


def _fused_ops(device: torch.device, head_dim: int) -> SimpleNamespace:
    """The norms, RoPE and SwiGLU product: Triton kernels on a GPU (see :mod:`kvslim.kernels.fused_ops`), the
    PyTorch references elsewhere. ``add_rms_norm`` takes ``delta=None`` for a plain norm."""
    if device.type == "cuda" and not head_dim & (head_dim - 1):
        from ..kernels import fused_ops

        def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
            return fused_ops.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)

        return SimpleNamespace(rms_norm=rms_norm, add_rms_norm=fused_ops.add_rms_norm, rotate=fused_ops.rotate_,
                               silu_mul=fused_ops.silu_mul)
    ref = fused_ops_ref

    def add_rms_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        return (x, ref.rms_norm(x, weight, eps)) if delta is None else ref.add_rms_norm(x, delta, weight, eps)

    return SimpleNamespace(rms_norm=ref.rms_norm, add_rms_norm=add_rms_norm, rotate=ref.rotate, silu_mul=ref.silu_mul)


class ModelRunner:
    """Runs a Hugging Face Llama/Qwen2/Qwen3/Mistral model's weights over a paged KV pool.

    They differ only where the weights say so: Qwen2 has q/k/v biases (inside the projections), Qwen3 an
    RMSNorm over each head's queries and keys before RoPE (``q_norm``/``k_norm``).
    """

    def __init__(self, model: Any, enforce_eager: bool = False):
        config = model.config
        if config.model_type not in SUPPORTED_MODELS:
            raise ValueError(f"the engine runs {', '.join(SUPPORTED_MODELS)} models, not {config.model_type!r} "
                             "(kvslim.Cache serves more architectures through model.generate)")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"the engine runs SwiGLU (silu) MLPs, not hidden_act={config.hidden_act!r}")
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type not in STATIC_ROPE:
            raise ValueError(f"rope_type={rope_type!r} changes with length; the engine supports {', '.join(STATIC_ROPE)}")
        self.model = model
        self.config = config
        self.layers = model.model.layers
        self.num_layers = len(self.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_heads = attn.q_proj.out_features // self.head_dim
        self.num_kv_heads = attn.k_proj.out_features // self.head_dim
        self.scaling = float(attn.scaling)
        self.eps = float(config.rms_norm_eps)
        self.qk_norm = hasattr(attn, "q_norm")
        weight = model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        rotary = model.model.rotary_emb
        self.inv_freq = rotary.inv_freq.to(self.device, torch.float32)
        self.rope_scale = float(rotary.attention_scaling)
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        # Mistral-style sliding-window attention is not implemented: refuse contexts where it would act.
        self.max_model_len = min(int(config.max_position_embeddings), int(window or 1 << 62))
        self.kv = make_store(None, self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device)
        #: the norms, RoPE and SwiGLU product: one Triton launch each on a GPU, Hugging Face's op order on the CPU
        self.ops = _fused_ops(self.device, self.head_dim)
        #: per layer, q/k/v stacked into one weight (and bias), gate/up into another (see engine/fused_weights.py)
        self.qkv = [stack_linears([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]) for l in self.layers]
        self.gate_up = [stack_linears([l.mlp.gate_proj, l.mlp.up_proj])[0] for l in self.layers]
        self.block_size = 0
        #: decode without CUDA graphs; set before :meth:`allocate` to capture none, after it to stop replaying them
        self.enforce_eager = enforce_eager
        #: decode-time compression: each decode step (eager or replayed) leaves every layer's queries in step_queries
        self.keep_queries = False
        #: (B, L, Hq, D) the last decode step's queries when ``keep_queries`` (a replay's: valid until the next one)
        self.step_queries: Tensor | None = None
        self.graphs: DecodeGraphs | None = None

    @classmethod
    def from_hf(cls, model: Any, enforce_eager: bool = False) -> "ModelRunner":
        return cls(model.eval(), enforce_eager)

    # -- the pool ---------------------------------------------------------------------------------
    def set_format(self, storage: Method | None) -> None:
        """Pages in the model dtype (None), as a quantizer packs them, or split with the host (KCache, PQCache);
        before :meth:`allocate`."""
        self.kv = make_store(storage, self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device)

    def allocate(self, num_blocks: int, block_size: int, rows: int) -> None:
        """``num_blocks`` blocks and ``rows`` ring rows for the block manager; with CUDA graphs, one more of each
        that it never hands out: the padding rows of a graph's batch write there."""
        self.graphs = None
        graphs = self.device.type == "cuda" and not self.enforce_eager and self.kv.graphable
        self.kv.allocate(num_blocks + graphs, block_size, rows + graphs)
        self.block_size = block_size
        if graphs:
            width = min(-(-self.max_model_len // block_size), num_blocks)
            self.graphs = DecodeGraphs(self, width, scratch_block=num_blocks, scratch_row=rows)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate block ``src`` into ``dst`` in every layer."""
        if copies:
            src, dst = (torch.tensor(x, device=self.device) for x in zip(*copies))
            self.kv.copy_blocks(src, dst)

    def _table(self, block_table: list[int]) -> Tensor:
        """A sequence's block table on the device, -1 after its last block: built once per prefill, since copying a
        host list to the device waits for the device's queue (one wait per layer otherwise)."""
        return self._upload(block_table + [-1])

    def _slots(self, table: Tensor, first: int, count: int) -> Tensor:
        """Flat pool slots of a sequence's logical slots [first, first + count) (``table`` from :meth:`_table`); -1
        past its blocks (quantized pages hold only packed tokens: the newest ones go to the ring, not to blocks)."""
        return self._flat(table, torch.arange(first, first + count, device=self.device))

    def _flat(self, table: Tensor, logical: Tensor) -> Tensor:
        """Flat pool slots of logical slots (any shape); -1 past the sequence's blocks."""
        blocks = table[(logical // self.block_size).clamp(max=len(table) - 1)]
        return torch.where(blocks >= 0, blocks * self.block_size + logical % self.block_size, -1)

    def _upload(self, values: list[int]) -> Tensor:
        """A host list on the device without making the host wait for the device's queue (from pinned memory on
        CUDA; ``torch.tensor(..., device=cuda)`` synchronises the stream, once per layer where it is called)."""
        host = torch.tensor(values)
        return host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host

    # -- model pieces -------------------------------------------------------------------------------
    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin (T, D) at ``positions``, computed on the device as Hugging Face does (no table, no host sync:
        a CUDA graph can replay it)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), -1)
        return (emb.cos() * self.rope_scale).to(self.dtype), (emb.sin() * self.rope_scale).to(self.dtype)

    def _qkv(self, i: int, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries (T,Hq,D), keys (T,H,D) and values (T,H,D) of layer ``i``: one GEMM, RoPE in place."""
        attn = self.layers[i].self_attn
        weight, bias = self.qkv[i]
        qkv = F.linear(x, weight, bias).view(len(x), -1, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], 1)
        if self.qk_norm:
            q, k = self.ops.rms_norm(q, attn.q_norm.weight, self.eps), self.ops.rms_norm(k, attn.k_norm.weight, self.eps)
        return self.ops.rotate(q, cos, sin), self.ops.rotate(k, cos, sin), v

    def _mlp(self, i: int, x: Tensor) -> Tensor:
        return self.layers[i].mlp.down_proj(self.ops.silu_mul(F.linear(x, self.gate_up[i])))

    def _layer_qkv(self, i: int, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Layer ``i`` up to its attention: heads-first rotated queries (Hq,T,D), keys and values (H,T,D) of hidden
        states (T, hidden). Tokens are independent here, so T may pack several sequences (cos/sin at each one's
        positions)."""
        h = self.ops.rms_norm(x, self.layers[i].input_layernorm.weight, self.eps)
        q, k, v = self._qkv(i, h, cos, sin)
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    def _layer_rest(self, i: int, x: Tensor, out: Tensor) -> Tensor:
        """Layer ``i`` after its attention: the hidden states (T, hidden) once the attention output (Hq,T,D) is
        projected and the MLP has run (per token, as :meth:`_layer_qkv`)."""
        layer = self.layers[i]
        x = x + layer.self_attn.o_proj(out.transpose(0, 1).reshape(len(x), -1))
        return x + self._mlp(i, self.ops.rms_norm(x, layer.post_attention_layernorm.weight, self.eps))

    def _norm(self, x: Tensor) -> Tensor:
        return self.ops.rms_norm(x, self.model.model.norm.weight, self.eps)

    def _logits(self, normed: Tensor) -> Tensor:
        return self.model.lm_head(normed).float()

    # -- prefill ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq: Sequence, compress: CompressHook | None, start: int | None = None, end: int | None = None
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Run a sequence's tokens ``[start, end)`` (by default all of them), store their keys/values; the last
        token's logits, page slots per (layer, head) and, for stores with a ring (quantized pages, KCache,
        PQCache), the tokens per (layer, head) left in the sequence's ring row.

        Without ``compress`` (no evictor), tokens the prefix cache already holds (``seq.num_cached_tokens``)
        are read from the pool, not recomputed (the last token always runs, for its logits); quantized pages
        give them back dequantized. With it, every layer's keys/values go through the hook and only what it
        keeps is stored; a suffix (tokens past ``seq.compressed_len``) then runs uncompressed (:meth:`_extend`)
        and the logits are its last token's (a sequence with a suffix is never split into chunks).

        Chunked prefill (``start``/``end`` inside the prompt): a chunk attends to the tokens before ``start``,
        read from the sequence's pages, as a cached prefix is. Until the last chunk every token is stored as it
        is and the newest queries the evictor observes are kept in ``seq.prefill_queries``; the last chunk runs
        the hook over the whole prompt's keys/values (pages, then its own) and those queries, which is what one
        unchunked prefill gives it, and its kept tokens overwrite the pages from slot 0.
        """
        tokens = seq.token_ids[: seq.compressed_len]
        whole = end is None or end >= len(tokens)  # the rest of the prompt (a suffix then runs after it)
        end = len(tokens) if whole else end
        if start is None:
            start = min(seq.num_cached_tokens, len(tokens) - 1) if compress is None else 0
        compressing = compress is not None and end == len(tokens)
        offset = 0 if compressing else max(start, seq.num_cached_tokens)  # first slot this call writes
        ids = self._upload(tokens[start:end])
        positions = torch.arange(start, end, device=self.device)
        cos, sin = self._rope(positions)
        x = self.model.model.embed_tokens(ids)
        probes = [self._probe_input(p, len(tokens)) for p in (compress.probe_inputs(tokens) if compressing else [])]
        table = self._table(seq.block_table)
        slots = self._slots(table, offset, end - offset)  # every slot this call may write, whatever a layer keeps
        #: per layer, the slots each head holds in pages and in the ring, on the device until every layer is stored:
        #: one host copy, not one per layer
        stored: list[tuple[Tensor, Tensor | None] | None] = [None] * self.num_layers
        for i in range(self.num_layers):
            q, k, v = self._layer_qkv(i, x, cos, sin)
            if start:
                past_k, past_v = self.kv.read(i, self._slots(table, 0, start))  # type: ignore[union-attr]
                k, v = torch.cat([past_k.transpose(0, 1), k], 1), torch.cat([past_v.transpose(0, 1), v], 1)
            out = self._attention(q, k, v, start)
            if compressing:
                queries = q if not start else torch.cat([seq.prefill_queries[i], q], 1)  # type: ignore[index]
                kept = compress(i, queries, k, v, [self._probe_layer(i, p, k, v) for p in probes])
            else:
                fresh = torch.full((self.num_kv_heads,), end - offset, device=self.device)
                kept = k[:, offset:], v[:, offset:], fresh
                if compress is not None:
                    self._observe(seq, i, q, compress.observed)
            if kept is not None:  # None: held until every layer is scored (a budget across layers, KVzip)
                stored[i] = self._store_prefill(seq, slots, i, kept)
            x = self._layer_rest(i, x, out)
        if compressing and compress.across_layers and probes:  # type: ignore[union-attr]
            for i, kept in enumerate(compress.held_layers(self.dtype)):  # type: ignore[union-attr]
                stored[i] = self._store_prefill(seq, slots, i, kept)
        held, tail = self._counts([stored])  # type: ignore[list-item]
        held = held[0] + offset
        tail = None if tail is None else tail[0]
        if whole and len(tokens) < len(seq):
            (logits,), (held,) = self._extend([seq], [held])
            return logits, held, tail
        return self._logits(self._norm(x[-1:]))[0], held, tail

    @torch.inference_mode()
    def prefill_batch(self, seqs: list[Sequence], compress: CompressHook | None
                      ) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`prefill` of several whole prompts in one forward: each runs from token 0 (no cached prefix, no
        chunk) and ``compress`` keeps no state from one layer of a prompt to the next (``Compression.batchable``);
        the suffixes then run together (:meth:`_extend`). Returns each last token's logits (B, vocab), page slots (B, L, H)
        and ring tokens (B, L, H) or None.

        Why: a prefill is host-bound on a GPU (Python and op dispatch, paid per layer per call), so prompts that
        share a forward share that cost. Their tokens are packed one after the other (no padding): the norms,
        projections, RoPE and MLP run once over all of them, and so does attention (:meth:`_padded_attention`),
        unless padding the prompts to the longest would more than double the tokens (then it runs per prompt).
        The hook runs once per layer for all of them (``Compression.compress_packed``: the evictor chooses for each
        prompt what it chooses alone), and each prompt's kept tokens are then stored in its own blocks; without a
        hook, a store that keeps nothing per sequence (no ring) writes every prompt's tokens at once.
        """
        lengths = [s.compressed_len for s in seqs]
        bounds = np.cumsum([0, *lengths]).tolist()
        spans = list(zip(bounds, bounds[1:]))
        ids = self._upload([t for s in seqs for t in s.token_ids[: s.compressed_len]])
        cos, sin = self._rope(self._upload([p for n in lengths for p in range(n)]))
        x = self.model.model.embed_tokens(ids)
        slots = [self._slots(self._table(s.block_table), 0, n) for s, n in zip(seqs, lengths)]
        whole = [torch.full((self.num_kv_heads,), n, device=self.device) for n in lengths]  # every token kept
        at_once = compress is None and not self.kv.ring
        all_slots = torch.cat(slots) if at_once else None
        all_kept = torch.full((self.num_kv_heads,), bounds[-1], device=self.device)
        width = max(lengths)
        padded = None
        if len(seqs) * width <= 2 * bounds[-1]:
            padded = self._upload([row * width + t for row, n in enumerate(lengths) for t in range(n)])
        prompts = None if compress is None else compress.packed(lengths, self.num_kv_heads, self._upload)
        stored: list[list[tuple[Tensor, Tensor | None]]] = [[] for _ in seqs]
        for i in range(self.num_layers):
            q, k, v = self._layer_qkv(i, x, cos, sin)
            if all_slots is not None:  # ``seq`` is read by ring stores only
                self.kv.store_prefill(i, seqs[0], all_slots, k, v, all_kept)
            elif prompts is None:
                for seq, held, seq_slots, kept_all, (lo, hi) in zip(seqs, stored, slots, whole, spans):
                    held.append(self._store_prefill(seq, seq_slots, i, (k[:, lo:hi], v[:, lo:hi], kept_all)))
            else:  # one call of the evictor for every prompt; a prompt keeps at most its own tokens
                kept_k, kept_v, kept_lens = compress.compress_packed(i, q, k, v, prompts)  # type: ignore[union-attr]
                for b, (seq, held, seq_slots, n) in enumerate(zip(seqs, stored, slots, lengths)):
                    kept = kept_k[b, :, :n], kept_v[b, :, :n], kept_lens[b]
                    held.append(self._store_prefill(seq, seq_slots, i, kept))
            if padded is not None:
                out = self._padded_attention(q, k, v, padded, len(seqs), width)
            else:
                out = torch.cat([self._attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], 0) for lo, hi in spans], 1)
            x = self._layer_rest(i, x, out)
        if all_slots is None:
            held_all, tail = self._counts(stored)
        else:  # every head of every layer holds its whole prompt
            held_all, tail = torch.tensor(lengths)[:, None, None].expand(-1, self.num_layers, self.num_kv_heads), None
        last = self._upload([hi - 1 for hi in bounds[1:]])
        logits, held = list(self._logits(self._norm(x[last]))), list(held_all)
        suffixed = [j for j, seq in enumerate(seqs) if seq.compressed_len < len(seq)]
        if suffixed:  # every question in one more forward
            extended = self._extend([seqs[j] for j in suffixed], [held[j] for j in suffixed])
            for j, row, slots in zip(suffixed, *extended):
                logits[j], held[j] = row, slots
        return torch.stack(logits), torch.stack(held), tail

    def _counts(self, stored: list[list[tuple[Tensor, Tensor | None]]]) -> tuple[Tensor, Tensor | None]:
        """Per sequence and layer, the device counts :meth:`_store_prefill` returned -> page slots (B, L, H) and
        ring tokens (B, L, H) or None, on the host: one copy for all of them, not one per layer or sequence."""
        counts = [t for layers in stored for pair in layers for t in (pair if self.kv.ring else pair[:1])]
        both = torch.stack(counts).view(len(stored), self.num_layers, -1, self.num_kv_heads).cpu()  # type: ignore[arg-type]
        return both[:, :, 0], both[:, :, 1] if self.kv.ring else None

    def _store_prefill(self, seq: Sequence, slots: Tensor, i: int, kept: tuple[Tensor, Tensor, Tensor]
                       ) -> tuple[Tensor, Tensor | None]:
        """Write layer ``i``'s kept keys, values (H,T',D) and lengths (H,) to the first T' of flat ``slots`` (from
        :meth:`_slots`); the slots each head then holds in pages and in the ring (None without one), on the device."""
        kept_k, kept_v, lens = kept
        paged, ring = self.kv.store_prefill(i, seq, slots[: kept_k.shape[1]], kept_k, kept_v, lens)
        return paged.to(self.device, torch.long), ring.to(self.device, torch.long) if self.kv.ring else None

    @staticmethod
    def _observe(seq: Sequence, layer: int, queries: Tensor, window: int) -> None:
        """Keep a chunk's newest ``window`` queries (Hq, w, D) after the earlier chunks' (chunked prefill)."""
        if seq.prefill_queries is None:
            seq.prefill_queries = []
        if layer < len(seq.prefill_queries):
            queries = torch.cat([seq.prefill_queries[layer], queries], 1)
            seq.prefill_queries[layer] = queries[:, -window:].clone()  # a copy: the chunk's queries are freed
        else:
            seq.prefill_queries.append(queries[:, -window:].clone())

    def _extend(self, seqs: list[Sequence], helds: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Run each sequence's tokens past its ``compressed_len`` uncompressed over what its prefill kept in model-dtype
        pages (``helds``: (L, H) slots per layer and KV head, on the host): each token attends to every slot its head
        holds and to its own sequence's tokens before it, and is stored right after them. Returns each sequence's last
        token's logits and the slots it holds after.

        Why: the query-agnostic protocol (a context compressed alone, then a question read from the compressed
        cache, as ``kvslim.Cache.appended`` does) must neither compress the question nor let it choose what the
        context keeps. The sequences of a batched prefill share one forward here too: their questions are packed,
        and attention runs as one padded, masked SDPA over each one's kept slots and its own tokens (run one
        sequence at a time, the questions of 110 RULER prompts cost as much as their batched contexts).
        """
        counts = [len(s) - s.compressed_len for s in seqs]
        rows, longest, width = len(seqs), max(counts), int(max(int(h.max()) for h in helds))
        ids = self._upload([t for s in seqs for t in s.token_ids[s.compressed_len :]])
        cos, sin = self._rope(self._upload([p for s in seqs for p in range(s.compressed_len, len(s))]))
        x = self.model.model.embed_tokens(ids)
        lens = torch.stack(helds).to(self.device)  # (B, L, H)
        tables = [self._table(s.block_table) for s in seqs]
        kept = torch.stack([self._slots(t, 0, width) for t in tables]).clamp(min=0).flatten()  # past a row's: masked
        steps = [torch.arange(n, device=self.device) for n in counts]
        new = torch.cat([self._flat(t, lens[b][:, :, None] + steps[b]) for b, t in enumerate(tables)], -1)  # (L, H, N)
        index = self._upload([b * longest + j for b, n in enumerate(counts) for j in range(n)])
        own = torch.ones(longest, longest, dtype=torch.bool, device=self.device).tril()
        group, heads = self.num_heads // self.num_kv_heads, self.num_kv_heads
        padded = lambda t: self._pad(t, index, rows, longest)  # noqa: E731
        for i in range(self.num_layers):
            q, k, v = self._layer_qkv(i, x, cos, sin)
            past_k, past_v = (t.view(rows, width, heads, -1).transpose(1, 2) for t in self.kv.read(i, kept))
            keys = torch.cat([past_k, padded(k)], 2).repeat_interleave(group, 1)
            values = torch.cat([past_v, padded(v)], 2).repeat_interleave(group, 1)
            held_here = torch.arange(width, device=self.device) < lens[:, i, :, None]  # (B, H, width)
            visible = torch.cat([held_here[:, :, None].expand(-1, -1, longest, -1),
                                 own.expand(rows, heads, -1, -1)], -1).repeat_interleave(group, 1)
            out = F.scaled_dot_product_attention(padded(q), keys, values, attn_mask=visible, scale=self.scaling)
            out = self._unpad(out, index)
            self.kv.write(i, new[i], k, v)
            x = self._layer_rest(i, x, out)
        last = self._upload((np.cumsum(counts) - 1).tolist())
        return list(self._logits(self._norm(x[last]))), [h + n for h, n in zip(helds, counts)]

    def _probe_input(self, ids: list[int], start: int) -> list[Tensor]:
        """A probe's hidden states and RoPE tables: its tokens sit at the positions after the prompt's."""
        positions = torch.arange(start, start + len(ids), device=self.device)
        return [self.model.model.embed_tokens(self._upload(ids)), *self._rope(positions)]

    def _probe_layer(self, i: int, probe: list[Tensor], k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Run a probe through layer ``i``, attending to the prompt's uncompressed keys/values (H,T,D) and to itself;
        advances its hidden states in place and returns its queries (Hq,P,D) and keys (H,P,D) there."""
        x, cos, sin = probe
        q_p, k_p, v_p = self._layer_qkv(i, x, cos, sin)
        out = self._attention(q_p, torch.cat([k, k_p], 1), torch.cat([v, v_p], 1), k.shape[1])
        probe[0] = self._layer_rest(i, x, out)
        return q_p, k_p

    @staticmethod
    def _pad(t: Tensor, index: Tensor, rows: int, width: int) -> Tensor:
        """Packed (heads, N, D) -> (rows, heads, width, D), token n at ``index[n]`` of the flattened (rows, width)
        batch, zeros elsewhere."""
        out = t.new_zeros(t.shape[0], rows * width, t.shape[2])
        out[:, index] = t
        return out.view(t.shape[0], rows, width, -1).transpose(0, 1)

    @staticmethod
    def _unpad(out: Tensor, index: Tensor) -> Tensor:
        """(rows, heads, width, D) -> the packed (heads, N, D) tokens at ``index`` (:meth:`_pad` undone)."""
        return out.transpose(0, 1).flatten(1, 2)[:, index]

    def _padded_attention(self, q: Tensor, k: Tensor, v: Tensor, index: Tensor, rows: int, width: int) -> Tensor:
        """Causal SDPA of packed sequences, each over its own tokens: (Hq,N,D) queries, (H,N,D) keys and values;
        ``index`` (N,) puts token t of sequence b at ``b * width + t`` of a (rows, width) right-padded batch.

        Exact for the real queries: causal masking hides the padding, which comes after them. One SDPA per layer
        instead of one per sequence: prefill is host-bound, and each call is several ops."""
        group = self.num_heads // self.num_kv_heads
        pad = lambda t: self._pad(t, index, rows, width)  # noqa: E731
        k, v = pad(k).repeat_interleave(group, 1), pad(v).repeat_interleave(group, 1)
        return self._unpad(F.scaled_dot_product_attention(pad(q), k, v, is_causal=True, scale=self.scaling), index)

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, offset: int) -> Tensor:
        """Causal SDPA of (Hq,T,D) queries over (H,offset+T,D) keys; query t sits at position offset + t.

        Keys and values are repeated to the query heads rather than passed with ``enable_gqa``: with
        it, torch falls back to the math kernel on CUDA, which materialises the whole T x T score matrix.
        """
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, 0)[None], v.repeat_interleave(group, 0)[None]
        if offset == 0:
            out = F.scaled_dot_product_attention(q[None], k, v, is_causal=q.shape[1] > 1, scale=self.scaling)
            return out[0]
        rows = torch.arange(q.shape[1], device=self.device)[:, None] + offset
        mask = torch.arange(k.shape[2], device=self.device)[None, :] <= rows
        return F.scaled_dot_product_attention(q[None], k, v, attn_mask=mask, scale=self.scaling)[0]

    # -- decode -------------------------------------------------------------------------------------
    def prepare_decode(self, seqs: list[Sequence]) -> DecodeBatch:
        """Tensors for one decode step; each sequence's blocks already have room for what it writes."""
        widest = max(len(s.block_table) for s in seqs)
        tables = np.full((len(seqs), widest), -1, dtype=np.int32)  # numpy fills rows from lists ~50x faster than
        for row, s in zip(tables, seqs):  # torch.tensor on nested lists (2 ms a step at 32 x 8k tokens)
            row[: len(s.block_table)] = s.block_table
        tables = torch.from_numpy(tables)
        held = torch.tensor([s.kv_slots for s in seqs])[:, None, None].repeat(1, self.num_layers, self.num_kv_heads)
        for row, s in enumerate(seqs):  # (B, L, H); ragged heads hold fewer
            if s.pad is not None:
                held[row] -= s.pad
        put = lambda x: x.to(self.device, non_blocking=True)  # noqa: E731
        return DecodeBatch(
            tokens=put(torch.tensor([s.last_token for s in seqs])),
            positions=put(torch.tensor([len(s) - 1 for s in seqs])),
            block_tables=put(tables),
            lens=put(held),
            starts=put(torch.tensor([s.window_start for s in seqs], dtype=torch.int32)),
            sinks=put(torch.tensor([s.sinks for s in seqs], dtype=torch.int32)),
            kv=self.kv.prepare(seqs, tables, held),
        )

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch) -> Tensor:
        """One token for every sequence of the batch: logits (B, vocab) in float32."""
        hidden = None
        if self.graphs is not None and not self.enforce_eager:
            hidden = self.graphs.run(batch)
            if hidden is not None and self.keep_queries:
                self.step_queries = self.graphs.queries[: len(hidden)]  # type: ignore[index]
        if hidden is None:
            hidden = self.forward_decode(batch)
        self.kv.finish(batch)
        return self._logits(hidden)

    @torch.inference_mode()
    def forward_decode(self, batch: DecodeBatch) -> Tensor:
        """What a graph captures of a decode step: write the new keys/values, attend; the last norm's output
        (B, hidden). The logits stay out: a graph's output buffer of every batch row times the vocabulary
        would take hundreds of MB."""
        cos, sin = self._rope(batch.positions)
        x = self.model.model.embed_tokens(batch.tokens)
        mlp_out = None  # each residual add is fused with the norm after it
        queries = []
        for i, layer in enumerate(self.layers):
            x, h = self.ops.add_rms_norm(x, mlp_out, layer.input_layernorm.weight, self.eps)
            q, k, v = self._qkv(i, h, cos, sin)
            if self.keep_queries:
                queries.append(q)
            out = self.kv.attend(i, q, k, v, batch, self.scaling)
            x, h = self.ops.add_rms_norm(x, layer.self_attn.o_proj(out.reshape(len(x), -1)),
                                         layer.post_attention_layernorm.weight, self.eps)
            mlp_out = self._mlp(i, h)
        if self.keep_queries:
            self.step_queries = torch.stack(queries, 1)
        return self.ops.add_rms_norm(x, mlp_out, self.model.model.norm.weight, self.eps)[1]


class DecodeGraphs:
    """CUDA graphs of :meth:`ModelRunner.forward_decode`, one per size of ``GRAPH_BATCHES``, captured on first use.

    Why: a decode step is a few hundred kernels (about ten per layer); for a small model or batch each
    runs for microseconds, so launching them from Python takes longer than the work, and a graph
    launches the whole step at once. A graph replays fixed addresses and shapes, so it reads static
    buffers: a batch of B sequences is copied into their first B rows and the size's remaining rows
    are padding; block tables are as wide as the longest sequence can get (the paged kernels spread each
    sequence's blocks over a number of programs fixed by that width alone, see
    :mod:`kvslim.kernels.paged_split`, and never read a table past a sequence's length, so columns left
    from wider batches are harmless). A padding row is a one-token sequence at position 0 whose key,
    value and ring slot are the scratch block and ring row :meth:`ModelRunner.allocate` keeps for it,
    so a replay never touches a real sequence's storage.

    ThinK's pages: the step's slots and each sequence's channel row are inputs; a padding row reads the scratch row.
    Per-head pages (:class:`~kvslim.engine.head_kv.HeadKV`): the step's per-head slots and each sequence's table row
    are inputs, the graph reads every column of the tables, and the scratch row's heads all point at the scratch block.

    Quantized pages: packing full rings into pages (the store's ``finish``) has data-dependent shapes,
    so it runs eagerly after the replay; the step's ring writes and the attention are in the graph.
    """

    def __init__(self, runner: ModelRunner, width: int, scratch_block: int, scratch_row: int):
        self.runner, self.width = runner, width
        self.scratch_block, self.scratch_row = scratch_block, scratch_row
        rows, device = GRAPH_BATCHES[-1], runner.device
        per_head = lambda: torch.empty(rows, runner.num_layers, runner.num_kv_heads, dtype=torch.long, device=device)  # noqa: E731
        flat = lambda dtype: torch.empty(rows, dtype=dtype, device=device)  # noqa: E731
        kv: Any = per_head()
        if runner.kv.quantized:
            kv = QuantStep(flat(torch.long), per_head(), per_head(), None)
        elif isinstance(runner.kv, ThinKV):
            kv = ThinStep(per_head(), flat(torch.long))
        elif isinstance(runner.kv, HeadKV):
            kv = HeadStep(per_head(), flat(torch.long), runner.kv.width)
            runner.kv.pad_row(scratch_row, scratch_block)
        #: the static inputs every graph reads (the DecodeBatch fields, GRAPH_BATCHES[-1] rows)
        self.inputs = DecodeBatch(flat(torch.long), flat(torch.long), torch.empty(rows, width, dtype=torch.int32, device=device),
                                  per_head(), flat(torch.int32), flat(torch.int32), kv)
        #: every graph writes its rows of this one output buffer
        self.hidden = torch.empty(rows, runner.model.config.hidden_size, dtype=runner.dtype, device=device)
        #: and, with decode-time compression (``runner.keep_queries``, set before the first capture), every layer's
        #: queries (rows, L, Hq, D) to this one
        self.queries: Tensor | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: Any = None
        self._pad(0, rows)
        self.filled = 0  # rows [0, filled) hold real sequences

    @torch.inference_mode()
    def run(self, batch: DecodeBatch) -> Tensor | None:
        """:meth:`ModelRunner.forward_decode` of one replayed step, (B, hidden), valid until the next replay; None
        when no graph fits the batch (too many sequences or too wide a block table)."""
        n = len(batch.tokens)
        size = next((b for b in GRAPH_BATCHES if b >= n), None)
        if size is None or batch.block_tables.shape[1] > self.width:
            return None
        if size not in self.graphs:
            self._capture(size)
        self._load(batch, n)
        self.graphs[size].replay()
        return self.hidden[:n]

    def capture(self, max_batch: int) -> None:
        """Capture now the graph of every size a batch of up to ``max_batch`` sequences runs in (each is otherwise
        captured on its first step), between steps."""
        for size in GRAPH_BATCHES:
            if size not in self.graphs:
                self._capture(size)
            if size >= max_batch:
                break

    def _kv_fields(self, kv: Any) -> list[Tensor]:
        if isinstance(kv, (ThinStep, HeadStep)):
            return [kv.slots, kv.rows]
        return [kv] if isinstance(kv, Tensor) else [kv.rows, kv.ring_write, kv.ring_lens]

    def _pad(self, lo: int, hi: int) -> None:
        """Make rows [lo, hi) padding (see the class docstring)."""
        x = self.inputs
        for t in (x.tokens, x.positions, x.lens, x.starts, x.sinks):
            t[lo:hi] = 0
        x.block_tables[lo:hi] = -1
        x.block_tables[lo:hi, 0] = self.scratch_block
        if isinstance(x.kv, Tensor):
            x.kv[lo:hi] = self.scratch_block * self.runner.block_size
        elif isinstance(x.kv, (ThinStep, HeadStep)):
            x.kv.slots[lo:hi] = self.scratch_block * self.runner.block_size
            x.kv.rows[lo:hi] = self.scratch_row
        else:
            x.kv.rows[lo:hi] = self.scratch_row
            x.kv.ring_write[lo:hi] = 0
            x.kv.ring_lens[lo:hi] = 1

    def _view(self, size: int) -> DecodeBatch:
        x = self.inputs
        if isinstance(x.kv, ThinStep):
            kv: Any = ThinStep(x.kv.slots[:size], x.kv.rows[:size])
        elif isinstance(x.kv, HeadStep):
            kv = HeadStep(x.kv.slots[:size], x.kv.rows[:size], x.kv.width)
        else:
            kv = x.kv[:size] if isinstance(x.kv, Tensor) else QuantStep(*(t[:size] for t in self._kv_fields(x.kv)), None)
        return DecodeBatch(x.tokens[:size], x.positions[:size], x.block_tables[:size], x.lens[:size],
                           x.starts[:size], x.sinks[:size], kv)

    def _capture(self, size: int) -> None:
        """Warm up (Triton compiles, cuBLAS picks its kernels) and capture on padding rows only: the stale rows
        of an earlier batch would otherwise rewrite their sequences' slots with keys of the wrong context."""
        self._pad(0, self.filled)
        self.filled = 0
        view = self._view(size)
        self.runner.forward_decode(view)
        torch.cuda.synchronize()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        if self.runner.keep_queries and self.queries is None:
            self.queries = torch.empty(self.hidden.shape[0], *self.runner.step_queries.shape[1:],  # type: ignore[union-attr]
                                       dtype=self.runner.dtype, device=self.hidden.device)
        with torch.cuda.graph(graph, pool=self.pool):
            self.hidden[:size] = self.runner.forward_decode(view)
            if self.runner.keep_queries:
                self.queries[:size] = self.runner.step_queries  # type: ignore[index]
        self.graphs[size] = graph

    def _load(self, batch: DecodeBatch, n: int) -> None:
        """Copy the batch into rows [0, n); rows a larger batch left behind become padding again."""
        x = self.inputs
        if self.filled > n:
            self._pad(n, self.filled)
        self.filled = n
        pairs = [(x.tokens, batch.tokens), (x.positions, batch.positions), (x.lens, batch.lens),
                 (x.starts, batch.starts), (x.sinks, batch.sinks),
                 *zip(self._kv_fields(x.kv), self._kv_fields(batch.kv))]
        for dst, src in pairs:
            dst[:n].copy_(src, non_blocking=True)
        x.block_tables[:n, : batch.block_tables.shape[1]].copy_(batch.block_tables, non_blocking=True)
