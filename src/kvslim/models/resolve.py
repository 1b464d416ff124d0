"""One resolver for every ``--model``: what a name or path is, its config, and its model and tokenizer.

``run``, ``bench``, ``serve``, ``calc``, ``kvslim.LLM`` and :func:`load_model` all go through
:func:`resolve`, which tries, in order:

1. a built-in name: a random-weight preset (``llama-3.1-8b``), a tiny test model (``tiny-llama``) or a
   packaged real model (``smollm2-135m``, ``qwen2.5-coder-0.5b``, see :mod:`.packaged`);
2. a local Hugging Face model directory (config.json + safetensors/bin + tokenizer files);
3. a ``.gguf`` file (de-quantized once and cached, see :mod:`.convert`);
4. a hub id (``Qwen/Qwen2.5-7B-Instruct``) found in the local Hugging Face cache, offline;
5. a ``config.json`` file: config only (the calculator), no weights.

Every failure is a ``ValueError`` whose message is one line naming the problem and the fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from . import hub, packaged
from .attention import implementation_for
from .convert import convert_gguf, converted_dir, gguf_config
from .presets import PRESETS, config_from_dict
from .tiny import TINY_MODELS, tiny_config, tiny_model

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class ModelSource:
    """What ``spec`` names. ``kind``: preset, tiny, packaged, directory, gguf, hub or config."""

    spec: str
    kind: str
    path: Path | None = None

    @property
    def real_weights(self) -> bool:
        return self.kind in ("packaged", "directory", "gguf", "hub")

    def config(self) -> PretrainedConfig:
        """The model's config; never reads weights (a packaged model gives its pinned header, fetched or not)."""
        if self.kind == "preset":
            return config_from_dict(PRESETS[self.spec])
        if self.kind == "tiny":
            return tiny_config(*TINY_MODELS[self.spec])
        if self.kind == "packaged":  # the published architecture and dtype (the converted copy says float32)
            return config_from_dict(packaged.get(self.spec).config or PRESETS[self.spec])
        if self.kind == "gguf":
            return gguf_config(self.path)  # type: ignore[arg-type]
        path = self.path if self.kind == "config" else self.path / "config.json"  # type: ignore[operator]
        return config_from_json(path)  # type: ignore[arg-type]

    def load(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             attn_implementation: str = "sdpa", seed: int = 0, progress: bool = False,
             ) -> tuple[PreTrainedModel, Any]:
        """Model (eval mode) and tokenizer (None for random-weight and tiny models).

        ``dtype=None``: real weights load in bfloat16 on a GPU and float32 on the CPU; tiny models keep
        float32 and presets their config's dtype (bfloat16).
        """
        if self.kind == "tiny":
            model = tiny_model(*TINY_MODELS[self.spec], seed=seed, attn_implementation=attn_implementation)
            return model.to(device=device, dtype=dtype), None
        if self.kind == "preset":
            return _random_model(self.config(), dtype, device, attn_implementation, seed), None
        if self.kind == "config":
            raise ValueError(f"{self.path} is a config without weights: give the model's directory, a .gguf file "
                             "or a built-in name to load a model (a config.json is enough for `kvslim calc`)")
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return load_directory(self.weights_dir(progress), dtype, device, attn_implementation)

    def weights_dir(self, progress: bool = False) -> Path:
        """A Hugging Face directory holding the weights (converting a GGUF or packaged model on first use)."""
        if self.kind == "packaged":
            return packaged.ensure_converted(packaged.get(self.spec), progress)
        if self.kind == "gguf":
            return convert_gguf(self.path, converted_dir(self.path))  # type: ignore[arg-type]
        return self.path  # type: ignore[return-value]


def builtin_names() -> list[str]:
    """Every built-in name, for help texts and error messages."""
    return list(dict.fromkeys([*packaged.PACKAGED, *PRESETS, *TINY_MODELS]))


def resolve(spec: str) -> ModelSource:
    """What ``spec`` names (see the module docstring for the order); ``ValueError`` when it names nothing usable."""
    spec = str(spec)
    if spec in packaged.PACKAGED:
        return ModelSource(spec, "packaged")
    if spec in PRESETS:
        return ModelSource(spec, "preset")
    if spec in TINY_MODELS:
        return ModelSource(spec, "tiny")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: give a Hugging Face model directory "
                             "(config.json, *.safetensors or *.bin weights, tokenizer files)")
        return ModelSource(spec, "directory", path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} does not exist: give the path of a .gguf model file")
        return ModelSource(spec, "gguf", path)
    if path.is_file() and path.suffix == ".json":
        return ModelSource(spec, "config", path)
    if hub.looks_like_hub_id(spec) and not path.exists():
        return ModelSource(spec, "hub", hub.cached_snapshot(spec))
    raise ValueError(
        f"unknown model {spec!r}: give a built-in name ({', '.join(builtin_names())}), a Hugging Face model "
        "directory, a .gguf file, a hub id cached locally (owner/name), or a config.json (calc only); "
        "`kvslim models` lists what is available here"
    )


def load_config(spec: str) -> PretrainedConfig:
    """The config of anything :func:`resolve` accepts, without loading weights."""
    return resolve(spec).config()


def load_model(spec: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa", seed: int = 0, progress: bool = False,
               ) -> tuple[PreTrainedModel, Any]:
    """Model (eval mode) and tokenizer (None when it has none) for anything :func:`resolve` accepts."""
    return resolve(spec).load(dtype, device, attn_implementation, seed, progress)


def load_directory(path: Path, dtype: torch.dtype, device: str | torch.device, attn_implementation: str = "sdpa",
                   ) -> tuple[PreTrainedModel, Any]:
    """A Hugging Face model directory, offline; its tokenizer when it has tokenizer files, else None."""
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ValueError(f"{path} has a config.json but no weights (*.safetensors or *.bin): copy the model's "
                         "weight files there, or use `kvslim calc` for the config alone")
    try:
        implementation = implementation_for(config_from_json(path / "config.json"), attn_implementation)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=implementation,
                                                     local_files_only=True)
    except ValueError as err:
        model_type = _model_type(path)
        raise ValueError(f"{path}: transformers cannot load model_type {model_type!r} as a causal language model "
                         f"({str(err).splitlines()[0]}): kvslim runs decoder-only models such as llama, mistral, "
                         "qwen2, qwen3, phi3, gemma2/3 and olmo2") from None
    tokenizer = None
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


def config_from_json(path: Path) -> PretrainedConfig:
    """Read a config.json without going through the hub machinery (works for any file name)."""
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): give the path of a Hugging Face config.json") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError(f"{path} has no 'model_type' key: give the path of a Hugging Face config.json")
    try:
        return config_from_dict(values)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: model_type {values['model_type']!r} is unknown to transformers "
                         f"({str(err).splitlines()[0]}): upgrade transformers or give a supported model") from None


def _model_type(path: Path) -> str:
    try:
        return str(json.loads((path / "config.json").read_text()).get("model_type"))
    except (OSError, json.JSONDecodeError):
        return "unknown"


def _random_model(config: PretrainedConfig, dtype: torch.dtype | None, device: str | torch.device,
                  attn_implementation: str, seed: int) -> PreTrainedModel:
    """An architecture with seeded random weights, for speed and memory benchmarks.

    The weights are created directly on ``device``: initialising 8B parameters on a CPU and copying them
    over would take minutes, while on a GPU it takes seconds.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype,
                                                 attn_implementation=implementation_for(config, attn_implementation))
    return model.eval()
