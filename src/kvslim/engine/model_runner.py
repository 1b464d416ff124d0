"""A direct Llama-family decoder (Llama, Qwen2, Mistral) over a paged KV pool.

Weights are the Hugging Face model's own tensors (no copy), so the engine and ``model.generate``
run the same numbers. Prefill runs one sequence at a time with torch SDPA over its whole prompt
(the method needs those keys and queries anyway); each layer's keys and values then go through the
compression hook straight into the sequence's blocks, so a long prompt never sits in the pool in
full. Decode runs every running sequence in one batch over the pool with paged attention.

The pool is a :mod:`kvslim.engine.kv_store` store: model-dtype pages, or quantized pages plus a
full-precision residual ring. A slot is ``block * block_size + offset``. Heads of one sequence may
hold different numbers of slots (ragged methods); a slot's position in the table, not its RoPE
position, orders it: keys are stored after rotation, so positions stay true whatever was evicted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..methods import Method
from .kv_store import make_store
from .sequence import Sequence

SUPPORTED_MODELS = ("llama", "qwen2", "mistral")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")

#: (layer, queries (Hq,T,D), keys (H,T,D), values (H,T,D)) -> kept keys, values (H,T',D) and lengths (H,)
CompressHook = Callable[[int, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face's RMSNorm, same op order (float32 statistics, weight applied in the input dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on (T, heads, D) with cos/sin (T, D), half-split layout as in Hugging Face."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None] + rotated * sin[:, None]


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


class ModelRunner:
    """Runs a Hugging Face Llama/Qwen2/Mistral model's weights over a paged KV pool."""

    def __init__(self, model: Any):
        config = model.config
        if config.model_type not in SUPPORTED_MODELS:
            raise ValueError(f"the engine runs {', '.join(SUPPORTED_MODELS)} models, not {config.model_type!r}")
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
        weight = model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        rotary = model.model.rotary_emb
        self.inv_freq = rotary.inv_freq.to(self.device, torch.float32)
        self.rope_scale = float(rotary.attention_scaling)
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        # Mistral-style sliding-window attention is not implemented: refuse contexts where it would act.
        self.max_model_len = min(int(config.max_position_embeddings), int(window or 1 << 62))
        self.kv = make_store(None, self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device)
        self.block_size = 0
        self._cos = self._sin = torch.empty(0, device=self.device)

    @classmethod
    def from_hf(cls, model: Any) -> "ModelRunner":
        return cls(model.eval())

    # -- the pool ---------------------------------------------------------------------------------
    def set_format(self, storage: Method | None) -> None:
        """Pages in the model dtype (None), as a quantizer packs them, or KCache's split; before :meth:`allocate`."""
        self.kv = make_store(storage, self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device)

    def allocate(self, num_blocks: int, block_size: int, rows: int) -> None:
        self.kv.allocate(num_blocks, block_size, rows)
        self.block_size = block_size

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate block ``src`` into ``dst`` in every layer."""
        if copies:
            src, dst = (torch.tensor(x, device=self.device) for x in zip(*copies))
            self.kv.copy_blocks(src, dst)

    def _slots(self, table: list[int], first: int, count: int) -> Tensor:
        """Flat pool slots of a sequence's logical slots [first, first + count); -1 past its blocks (quantized
        pages hold only packed tokens: the newest ones go to the ring, not to blocks)."""
        logical = torch.arange(first, first + count, device=self.device)
        index = (logical // self.block_size).clamp(max=len(table))
        blocks = torch.tensor(table + [-1], device=self.device)[index]
        return torch.where(blocks >= 0, blocks * self.block_size + logical % self.block_size, -1)

    # -- model pieces -------------------------------------------------------------------------------
    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        top = int(positions.max()) + 1
        if top > self._cos.shape[0]:
            grid = torch.arange(max(top, 2 * self._cos.shape[0]), device=self.device, dtype=torch.float32)
            freqs = grid[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), -1)
            self._cos, self._sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        return self._cos[positions].to(self.dtype), self._sin[positions].to(self.dtype)

    def _qkv(self, layer: Any, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries (T,Hq,D), keys (T,H,D) and values (T,H,D) of one layer."""
        attn = layer.self_attn
        q = attn.q_proj(x).view(-1, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _mlp(self, layer: Any, x: Tensor) -> Tensor:
        mlp = layer.mlp
        return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))

    def _logits(self, x: Tensor) -> Tensor:
        x = rms_norm(x, self.model.model.norm.weight, self.eps)
        return self.model.lm_head(x).float()

    # -- prefill ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq: Sequence, compress: CompressHook | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Run a sequence's tokens, store their keys/values; last-token logits, page slots per (layer, head)
        and, for stores with a ring (quantized pages, KCache), the tokens per (layer, head) left in the sequence's ring row.

        Without ``compress``, tokens the prefix cache already holds (``seq.num_cached_tokens``) are
        read from the pool, not recomputed (the last token always runs, for its logits). With it,
        every layer's keys/values go through the hook and only what it keeps is stored.
        """
        tokens = seq.token_ids
        cached = seq.num_cached_tokens if compress is None else 0
        first = min(cached, len(tokens) - 1)
        ids = torch.tensor(tokens[first:], device=self.device)
        positions = torch.arange(first, len(tokens), device=self.device)
        cos, sin = self._rope(positions)
        x = self.model.model.embed_tokens(ids)
        held = torch.empty(self.num_layers, self.num_kv_heads, dtype=torch.long)
        tail = torch.empty_like(held) if self.kv.ring else None
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_layernorm.weight, self.eps)
            q, k, v = self._qkv(layer, h, cos, sin)
            if first:
                past_k, past_v = self.kv.read(i, self._slots(seq.block_table, 0, first))  # type: ignore[union-attr]
                k, v = torch.cat([past_k, k]), torch.cat([past_v, v])
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
            out = self._attention(q, k, v, first)
            if compress is None:
                fresh = torch.full((self.num_kv_heads,), len(tokens) - cached, device=self.device)
                kept_k, kept_v, lens = k[:, cached:], v[:, cached:], fresh
            else:
                kept_k, kept_v, lens = compress(i, q, k, v)
            slots = self._slots(seq.block_table, cached, kept_k.shape[1])
            paged, ring = self.kv.store_prefill(i, seq, slots, kept_k, kept_v, lens)
            held[i] = paged.cpu() + cached
            if tail is not None:
                tail[i] = ring.cpu()
            x = x + layer.self_attn.o_proj(out.transpose(0, 1).reshape(len(ids), -1))
            x = x + self._mlp(layer, rms_norm(x, layer.post_attention_layernorm.weight, self.eps))
        return self._logits(x[-1:])[0], held, tail

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
        tables = torch.tensor([s.block_table + [-1] * (widest - len(s.block_table)) for s in seqs], dtype=torch.int32)
        held = torch.stack([s.slot_lens(self.num_layers, self.num_kv_heads) for s in seqs])  # (B, L, H)
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
        cos, sin = self._rope(batch.positions)
        x = self.model.model.embed_tokens(batch.tokens)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_layernorm.weight, self.eps)
            q, k, v = self._qkv(layer, h, cos, sin)
            out = self.kv.attend(i, q, k, v, batch, self.scaling)
            x = x + layer.self_attn.o_proj(out.reshape(len(x), -1))
            x = x + self._mlp(layer, rms_norm(x, layer.post_attention_layernorm.weight, self.eps))
        self.kv.finish(batch)
        return self._logits(x)
