"""Route a Hugging Face model's attention through kvslim while a kvslim cache serves it.

Eviction leaves each layer, head and sequence with its own length, which the model's one shared
attention mask cannot express, and scoring methods need the queries, which ``Cache.update`` never
sees. So a :class:`kvslim.Cache` switches the model config's attention implementation to a kvslim
twin of it (``kvslim_sdpa`` / ``kvslim_eager``): the twin runs the original function unchanged
unless the layer it serves has just been updated by a kvslim cache, in which case the cache attends
over its own storage with an exact per-(sequence, head) mask and then lets the method act.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

PREFIX = "kvslim_"
_pending = threading.local()


def eager_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    scaling: float, dropout: float = 0.0, softcap: float | None = None,
                    **kwargs: Any) -> tuple[Tensor, Tensor]:
    """Hugging Face's eager attention (matmul, softcap, additive mask, float32 softmax), for models that use it.

    It stands in for every model's own eager function, so it applies what those do beyond the plain
    formula: Gemma 2's attention logit softcapping (the window is in the mask the model built).
    """
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    weights = capped(torch.matmul(query, key.transpose(2, 3)) * scaling, softcap)
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def capped(logits: Tensor, softcap: float | None) -> Tensor:
    """Attention logit softcapping, ``softcap * tanh(logits / softcap)``; the logits unchanged when None."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def set_pending(cache: Any, layer_idx: int) -> None:
    """Called by the cache's ``update``: the next attention call serves this layer of this cache."""
    if getattr(_pending, "value", None) is not None:
        stale = _pending.value
        _pending.value = None
        raise RuntimeError(
            f"layer {stale[1]}'s attention did not run through kvslim: build the cache with the model's own config "
            "object, kvslim.Cache(policy, model.config), before the forward pass (the model's attention "
            f"implementation must be kvslim's; it is {getattr(stale[0].config, '_attn_implementation', None)!r})"
        )
    _pending.value = (cache, layer_idx)


def take_pending() -> tuple[Any, int] | None:
    value = getattr(_pending, "value", None)
    _pending.value = None
    return value


def clear_pending() -> None:
    _pending.value = None


def _twin(base_name: str) -> Callable[..., tuple[Tensor, Tensor | None]]:
    def attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        base = eager_attention if base_name == "eager" else ALL_ATTENTION_FUNCTIONS[base_name]
        pending = take_pending()
        if pending is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        cache, layer_idx = pending
        return cache.attend(layer_idx, module, query, attention_mask, base, base_name, kwargs)

    attention.__name__ = f"{PREFIX}{base_name}"
    return attention


def route(config: Any) -> None:
    """Switch ``config``'s attention to its kvslim twin (idempotent); sdpa and eager are supported."""
    current = getattr(config, "_attn_implementation", None) or "eager"
    if current.startswith(PREFIX):
        return
    if current not in ("sdpa", "eager"):
        raise ValueError(
            f"kvslim.Cache supports attn_implementation 'sdpa' or 'eager', not {current!r}: load the model with "
            "attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))"
        )
    name = PREFIX + current
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _twin(current))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    config._attn_implementation = name


def base_impl(config: Any) -> str:
    """'sdpa' or 'eager': the implementation a routed config stands for."""
    return (getattr(config, "_attn_implementation", None) or "eager").removeprefix(PREFIX)


def masked_attention(query: Tensor, keys: Tensor, values: Tensor, allowed: Tensor | None, scaling: float,
                     impl: str, softcap: float | None = None) -> Tensor:
    """Attention of (B,Hq,q,D) queries over (B,H,T,D) keys with a per-head boolean mask (B,H,q,T); None: all keys.

    Returns (B, q, Hq, D) like Hugging Face's attention functions. Softcapped logits take the eager path
    (SDPA cannot cap them). A decoding step's single query (SDPA) never repeats keys to the query heads (a copy of
    the whole layer per step): each KV head is answered with its query group as the rows (transformers'
    ``pack_gqa``), except without a mask on a GPU, where it is the very call transformers makes for its own caches
    (SDPA's ``enable_gqa``), so the kernel that serves DynamicCache serves the full cache too (on an H200 the grouped
    rows decoded 58% slower than DynamicCache at 8k with nearly the same op count; on a CPU they are ~2.6x faster
    than ``enable_gqa``, benchmarks/hf_decode.py records both per run).
    """
    batch, q_heads, q_len, dim = query.shape
    heads = keys.shape[1]
    group = q_heads // heads
    if q_len == 1 and impl != "eager" and softcap is None and allowed is None and query.is_cuda:
        out = F.scaled_dot_product_attention(query, keys, values, scale=scaling, enable_gqa=group > 1)
        return out.transpose(1, 2)  # (B, 1, Hq, D): contiguous, the query axis has one entry
    if q_len == 1 and impl != "eager" and softcap is None:  # query head h*G+g reads KV head h
        rows = query.reshape(batch, heads, group, dim)
        out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=allowed, scale=scaling)
        return out.reshape(batch, 1, q_heads, -1)
    if allowed is None:
        allowed = torch.ones(batch, heads, q_len, keys.shape[2], dtype=torch.bool, device=keys.device)
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    allowed = allowed.repeat_interleave(group, 1)
    if impl == "eager" or softcap is not None:
        weights = capped(torch.matmul(query, keys.transpose(2, 3)) * scaling, softcap)
        weights = weights.masked_fill(~allowed, torch.finfo(weights.dtype).min)
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(weights, values)
    else:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2).contiguous()


def key_padding(attention_mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """(B, T) True for real prompt tokens, read off the mask the model built for a first prefill.

    Token t is real when query t may see itself: the mask's diagonal. (Not its last row: a sliding-window
    layer's last query sees only the window, yet the tokens before it are real.)
    """
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    diagonal = attention_mask[:, 0, :length, :length].diagonal(dim1=-2, dim2=-1)
    if diagonal.dtype == torch.bool:
        return diagonal
    return diagonal > torch.finfo(diagonal.dtype).min / 2
