"""The KV geometry of a model: everything that decides how many bytes one cached token costs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KVShape:
    """Per-model KV cache geometry; MHA, GQA and MQA differ only in ``num_kv_heads``."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (1 for MHA, ``num_heads`` for MQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def element_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token costs across all layers in a full (uncompressed) cache: K and V."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_bytes

    @property
    def attention(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype | None = None) -> "KVShape":
        """Read the geometry off a transformers config (or any object with the same attribute names)."""
        text = getattr(config, "get_text_config", None)
        config = text() if callable(text) else config
        missing = [a for a in ("num_hidden_layers", "num_attention_heads") if getattr(config, a, None) is None]
        if missing:
            raise ValueError(
                f"config {type(config).__name__} lacks {', '.join(missing)}: pass a decoder-only transformers config "
                "(e.g. model.config of a Llama, Qwen2, Mistral or GPT-NeoX model)"
            )
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        if dtype is None:
            dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype)
        return cls(int(config.num_hidden_layers), heads, kv_heads, int(head_dim), dtype)
