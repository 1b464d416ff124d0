"""GGUF files as ordinary Hugging Face model directories, converted once and cached.

transformers de-quantizes a GGUF into float32 tensors on every load (20 s for 135M parameters, about
a minute for 630M on two cores). kvslim does it once and keeps the result as a plain directory
(safetensors + tokenizer) under :func:`cache_dir`; later loads take a second or two.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

#: the files a converted directory must hold to be complete (tokenizer files vary by tokenizer class)
COMPLETE = ("config.json", "model.safetensors")


def cache_dir() -> Path:
    """Where kvslim keeps converted and joined models: ``$KVSLIM_CACHE`` or ``~/.cache/kvslim``."""
    return Path(os.environ.get("KVSLIM_CACHE") or Path.home() / ".cache" / "kvslim").expanduser()


def gguf_config(path: Path) -> PretrainedConfig:
    """The config a GGUF file's metadata describes, without reading its tensors."""
    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as err:  # gguf's reader raises ValueError, KeyError, struct errors... on a damaged file
        raise ValueError(f"{path} is not a readable GGUF model ({_one_line(err)}): give an intact .gguf file") from None


def converted_dir(path: Path) -> Path:
    """The cache directory for a user's GGUF file, keyed by its absolute path, size and modification time,
    so an edited or replaced file is converted again instead of silently served stale."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def convert_gguf(path: Path, target: Path) -> Path:
    """De-quantize ``path`` into ``target`` (atomically: it is complete or absent) and return ``target``."""
    if is_complete(target):
        return target
    gguf_config(path)  # a damaged file fails here with one line, before any work
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
        )
    except Exception as err:
        raise ValueError(f"{path} could not be converted ({_one_line(err)}): give a GGUF of a decoder "
                         "architecture transformers can read (llama, mistral, qwen2, qwen3, phi3, gemma...)") from None
    # The weights are plain float32 tensors now, but transformers still flags the model as GGUF-quantized,
    # which blocks save_pretrained() and .half()/.float(); drop the flag so it is an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    write_atomically(target, lambda staging: (model.save_pretrained(staging), tokenizer.save_pretrained(staging)))
    return target


def is_complete(directory: Path) -> bool:
    return directory.is_dir() and all((directory / name).is_file() for name in COMPLETE)


def write_atomically(target: Path, fill: Callable[[Path], object]) -> None:
    """Fill a temporary sibling of ``target``, then rename it into place.

    A rename within one file system is atomic, so ``target`` either is complete or does not exist: an
    interrupted write leaves no broken cache, only a temporary directory that is removed here. If another
    process finished first, its copy is kept and ours is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fill(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
