"""A two-layer random model with Qwen2.5-0.5B's attention shapes, for ThinK's engine tests."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel


def qwen_shaped() -> PreTrainedModel:
    """14 query heads over 2 KV heads (a group of 7, not a power of two) of 64 channels, so ThinK keeps 32 key
    channels beside 64-wide values: the shapes of the H200 RULER runs, which the 4-head tiny models do not have."""
    config = AutoConfig.for_model("qwen2", num_hidden_layers=2, hidden_size=896, num_attention_heads=14,
                                  num_key_value_heads=2, head_dim=64, intermediate_size=128, vocab_size=256,
                                  max_position_embeddings=4096, dtype="float32")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
