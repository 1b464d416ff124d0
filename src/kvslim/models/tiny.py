"""Tiny random models of real architectures, so tests exercise MHA, GQA and MQA in milliseconds on a CPU."""
from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .attention import implementation_for

#: per-architecture settings of the tiny configs: each one keeps what makes its attention different (q/k norms,
#: fused qkv, sliding-window layers with a 16-token window, logit softcapping, a query scale that is not head_dim)
_TINY_EXTRAS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "mistral": {},
    "qwen3": {},
    "phi3": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},  # the defaults lie outside a 256-token vocab
    "olmo2": {"eos_token_id": 2},
    # random weights give attention logits of a few hundredths: a cap of 0.05 makes Gemma 2's softcapping matter
    "gemma2": {"sliding_window": 16, "query_pre_attn_scalar": 8, "attn_logit_softcapping": 0.05},
    "gemma3_text": {"sliding_window": 16, "query_pre_attn_scalar": 8,
                    "layer_types": ["sliding_attention", "full_attention"]},
}
TINY_ARCHS = tuple(_TINY_EXTRAS)
_TINY_KV_HEADS = {"mha": 4, "gqa": 2, "mqa": 1}

TINY_MODELS: dict[str, tuple[str, str]] = {
    "tiny-llama": ("llama", "gqa"),
    "tiny-llama-mha": ("llama", "mha"),
    "tiny-llama-mqa": ("llama", "mqa"),
    "tiny-qwen2": ("qwen2", "gqa"),
    "tiny-mistral": ("mistral", "gqa"),
    "tiny-qwen3": ("qwen3", "gqa"),
    "tiny-phi3": ("phi3", "gqa"),
    "tiny-gemma2": ("gemma2", "gqa"),
    "tiny-gemma3": ("gemma3_text", "gqa"),
    "tiny-olmo2": ("olmo2", "gqa"),
}


def tiny_config(arch: str = "llama", attention: str = "gqa") -> PretrainedConfig:
    """A 2-layer float32 config of a real architecture, small enough for CPU tests yet with 4 query heads,
    so MHA (4 KV heads), GQA (2) and MQA (1) can all be exercised."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}: use one of {', '.join(TINY_ARCHS)}")
    if attention not in _TINY_KV_HEADS:
        raise ValueError(f"unknown attention {attention!r}: use one of {', '.join(_TINY_KV_HEADS)}")
    return AutoConfig.for_model(
        arch,
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=_TINY_KV_HEADS[attention],
        head_dim=16,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=4096,
        dtype="float32",
        **_TINY_EXTRAS[arch],
    )


def tiny_model(
    arch: str = "llama", attention: str = "gqa", seed: int = 0, attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    """A tiny model with seeded random weights in eval mode: same seed, same weights, so tests are repeatable."""
    config = tiny_config(arch, attention)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation_for(config, attn_implementation))
    return model.eval()
