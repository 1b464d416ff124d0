"""Which Hugging Face models ``kvslim.Cache`` serves, and the attention window of each of their layers.

The cache stands in for transformers' own cache under the model's attention functions, so it serves
any decoder whose layers are all standard softmax attention, global or sliding-window: Llama,
Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3, OLMo 2 and their kin. A model with anything else
(encoder-decoder cross attention, state-space or linear-attention layers, chunked attention, latent
attention) is refused up front with a ValueError rather than failing inside its forward pass.
"""
from __future__ import annotations

from typing import Any

SUPPORTED = (
    "decoder-only models whose layers are all softmax attention, global or sliding-window "
    "(e.g. Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3, OLMo 2)"
)
LAYER_TYPES = ("full_attention", "sliding_attention")
#: config fields that only state-space / hybrid models and latent attention have (for configs without layer_types)
_UNSUPPORTED_FIELDS = {
    "layers_block_type": "state-space (Mamba) layers",
    "mamba_d_state": "state-space (Mamba) layers",
    "ssm_state_size": "state-space (Mamba) layers",
    "kv_lora_rank": "multi-head latent attention",
}


def layer_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window in tokens (None for global attention), read as transformers' DynamicCache
    reads it; raises ValueError for a model the cache cannot serve."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    name = getattr(text, "model_type", type(text).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"kvslim.Cache serves {SUPPORTED}; {name!r} is an encoder-decoder model")
    for field, what in _UNSUPPORTED_FIELDS.items():
        if getattr(text, field, None) is not None:
            raise ValueError(f"kvslim.Cache serves {SUPPORTED}; {name!r} has {what}")
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types is None:
        return [window] * int(text.num_hidden_layers)
    other = sorted(set(types) - set(LAYER_TYPES))
    if other:
        raise ValueError(f"kvslim.Cache serves {SUPPORTED}; {name!r} has {', '.join(other)} layers")
    return [window if kind == "sliding_attention" else None for kind in types]
