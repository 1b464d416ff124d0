"""A direct Llama-family decoder (Llama, Qwen2, Mistral) over a paged KV pool.

Weights are the Hugging Face model's own tensors (no copy), so the engine and ``model.generate``
run the same numbers. Prefill runs one sequence at a time with torch SDPA over its whole prompt
(the method needs those keys and queries anyway); each layer's keys and values then go through the
compression hook straight into the sequence's blocks, so a long prompt never sits in the pool in
full. Decode runs every running sequence in one batch over the pool with paged attention.

Pool layout: ``k_cache[layer]`` is ``(num_blocks, block_size, kv_heads, head_dim)``; a slot is
``block * block_size + offset``. Heads of one sequence may hold different numbers of slots
(ragged methods); a slot's position in the table, not its RoPE position, orders it: keys are stored
after rotation, so positions stay true whatever was evicted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.paged_attention_ref import paged_decode_ref
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
    lens: Tensor  # (B, L, H) slots held per layer and KV head, the new token included
    write_slots: Tensor  # (B, L, H) flat pool slot the new token's key/value goes to
    starts: Tensor  # (B,) sliding-window start slot (0 when none)
    sinks: Tensor  # (B,) slots always visible before the window


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
        self.k_cache = self.v_cache = torch.empty(0)
        self.block_size = 0
        self._cos = self._sin = torch.empty(0, device=self.device)
        self._attend = _paged_backend(self.device)

    @classmethod
    def from_hf(cls, model: Any) -> "ModelRunner":
        return cls(model.eval())

    # -- the pool ---------------------------------------------------------------------------------
    def block_bytes(self, block_size: int) -> int:
        """Bytes one block costs across all layers, keys and values."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element

    def allocate(self, num_blocks: int, block_size: int) -> None:
        shape = (self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.block_size = block_size

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate block ``src`` into ``dst`` in every layer."""
        if copies:
            src, dst = (torch.tensor(x, device=self.device) for x in zip(*copies))
            self.k_cache[:, dst] = self.k_cache[:, src]
            self.v_cache[:, dst] = self.v_cache[:, src]

    def _slots(self, table: list[int], first: int, count: int) -> Tensor:
        """Flat pool slots of a sequence's logical slots [first, first + count)."""
        logical = torch.arange(first, first + count, device=self.device)
        blocks = torch.tensor(table, device=self.device)[logical // self.block_size]
        return blocks * self.block_size + logical % self.block_size

    def _write(self, layer: int, table: list[int], first: int, keys: Tensor, values: Tensor, lens: Tensor) -> None:
        """Store (H, T, D) keys/values at logical slots first.. per head, only the first ``lens[h]`` of each."""
        heads, length = keys.shape[:2]
        valid = torch.arange(length, device=self.device) < lens[:, None]
        slots = self._slots(table, first, length).expand(heads, length)[valid]
        head = torch.arange(heads, device=self.device)[:, None].expand(heads, length)[valid]
        self.k_cache[layer].view(-1, heads, self.head_dim)[slots, head] = keys[valid]
        self.v_cache[layer].view(-1, heads, self.head_dim)[slots, head] = values[valid]

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
    def prefill(self, seq: Sequence, compress: CompressHook | None) -> tuple[Tensor, Tensor]:
        """Run a sequence's tokens, store their keys/values in its blocks; last-token logits and slots per (layer, head).

        Without ``compress``, tokens the prefix cache already holds (``seq.num_cached_tokens``) are
        read from the pool, not recomputed (the last token always runs, for its logits). With it,
        every layer's keys/values go through the hook and only what it keeps is written.
        """
        tokens = seq.token_ids
        cached = seq.num_cached_tokens if compress is None else 0
        first = min(cached, len(tokens) - 1)
        ids = torch.tensor(tokens[first:], device=self.device)
        positions = torch.arange(first, len(tokens), device=self.device)
        cos, sin = self._rope(positions)
        x = self.model.model.embed_tokens(ids)
        held = torch.empty(self.num_layers, self.num_kv_heads, dtype=torch.long)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_layernorm.weight, self.eps)
            q, k, v = self._qkv(layer, h, cos, sin)
            if first:
                slots = self._slots(seq.block_table, 0, first)
                k = torch.cat([self.k_cache[i].view(-1, self.num_kv_heads, self.head_dim)[slots], k])
                v = torch.cat([self.v_cache[i].view(-1, self.num_kv_heads, self.head_dim)[slots], v])
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
            out = self._attention(q, k, v, first)
            if compress is None:
                fresh = torch.full((self.num_kv_heads,), len(tokens) - cached, device=self.device)
                self._write(i, seq.block_table, cached, k[:, cached:], v[:, cached:], fresh)
                held[i] = len(tokens)
            else:
                kept_k, kept_v, lens = compress(i, q, k, v)
                self._write(i, seq.block_table, 0, kept_k, kept_v, lens)
                held[i] = lens.cpu()
            x = x + layer.self_attn.o_proj(out.transpose(0, 1).reshape(len(ids), -1))
            x = x + self._mlp(layer, rms_norm(x, layer.post_attention_layernorm.weight, self.eps))
        return self._logits(x[-1:])[0], held

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
        """Tensors for one decode step; each sequence's blocks already have room for the new token."""
        widest = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [-1] * (widest - len(s.block_table)) for s in seqs], dtype=torch.int32)
        before = torch.stack([s.slot_lens(self.num_layers, self.num_kv_heads) for s in seqs])  # (B, L, H)
        block = tables.long().gather(1, before.flatten(1) // self.block_size).view_as(before)
        write = block * self.block_size + before % self.block_size
        put = lambda x: x.to(self.device, non_blocking=True)  # noqa: E731
        return DecodeBatch(
            tokens=put(torch.tensor([s.last_token for s in seqs])),
            positions=put(torch.tensor([len(s) - 1 for s in seqs])),
            block_tables=put(tables),
            lens=put(before + 1),
            write_slots=put(write),
            starts=put(torch.tensor([s.window_start for s in seqs], dtype=torch.int32)),
            sinks=put(torch.tensor([s.sinks for s in seqs], dtype=torch.int32)),
        )

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch) -> Tensor:
        """One token for every sequence of the batch: logits (B, vocab) in float32."""
        cos, sin = self._rope(batch.positions)
        x = self.model.model.embed_tokens(batch.tokens)
        heads = torch.arange(self.num_kv_heads, device=self.device).expand(len(x), -1)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_layernorm.weight, self.eps)
            q, k, v = self._qkv(layer, h, cos, sin)
            slots = batch.write_slots[:, i]
            self.k_cache[i].view(-1, self.num_kv_heads, self.head_dim)[slots, heads] = k
            self.v_cache[i].view(-1, self.num_kv_heads, self.head_dim)[slots, heads] = v
            out = self._attend(q, self.k_cache[i], self.v_cache[i], batch.block_tables, batch.lens[:, i],
                               batch.starts, batch.sinks, self.scaling)
            x = x + layer.self_attn.o_proj(out.reshape(len(x), -1))
            x = x + self._mlp(layer, rms_norm(x, layer.post_attention_layernorm.weight, self.eps))
        return self._logits(x)


def _paged_backend(device: torch.device) -> Callable[..., Tensor]:
    """The Triton kernel on CUDA when Triton is installed, else the PyTorch reference."""
    if device.type == "cuda":
        try:
            from ..kernels.paged_attention import paged_decode
        except ImportError:
            return paged_decode_ref
        return paged_decode
    return paged_decode_ref
