"""``kvslim models``: what this machine can run, with the numbers that size a KV cache."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..shape import KVShape
from . import hub, packaged
from .convert import is_complete
from .presets import PRESETS
from .resolve import ModelSource
from .tiny import TINY_MODELS


@dataclass
class Entry:
    """One row of the listing; ``status`` says whether it runs now and, if not, how to make it run."""

    name: str
    source: str  # packaged, preset, tiny, hf-cache
    status: str
    architecture: str
    params: int | None
    context: int | None
    kv_bytes_per_token: int | None  # full cache, bfloat16, all layers, K and V

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def list_models(include_tiny: bool = False) -> list[Entry]:
    """Packaged models, random-weight presets, models found in the Hugging Face cache (tiny ones on request)."""
    rows = [_entry(ModelSource(name, "packaged"), "packaged", _packaged_status(model))
            for name, model in packaged.PACKAGED.items()]
    rows += [_entry(ModelSource(name, "preset"), "preset", "random weights (speed and memory)")
             for name in PRESETS if name not in packaged.PACKAGED]
    if include_tiny:
        rows += [_entry(ModelSource(name, "tiny"), "tiny", "random weights (tests)") for name in TINY_MODELS]
    rows += [_entry(ModelSource(repo, "directory", path), "hf-cache", f"cached at {path}")
             for repo, path in hub.cached_models()]
    return rows


def _packaged_status(model: packaged.Packaged) -> str:
    if is_complete(model.converted):
        return "ready"
    if packaged.part_paths(model) is not None:
        return "installed (converted on first use)"
    return f"not fetched: {model.install_command()}"


def _entry(source: ModelSource, kind: str, status: str) -> Entry:
    try:
        config = source.config()
    except ValueError as err:
        return Entry(source.spec, kind, f"unreadable: {err}", "?", None, None, None)
    shape = KVShape.from_config(config, torch.bfloat16)
    return Entry(source.spec, kind, status, config.model_type, count_parameters(config),
                 getattr(config, "max_position_embeddings", None), shape.bytes_per_token)


def count_parameters(config: PretrainedConfig) -> int | None:
    """Parameters of the architecture, counted on the meta device (nothing allocated)."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError):
        return None
    return sum(p.numel() for p in model.parameters())


def format_table(rows: list[Entry]) -> str:
    lines = [f"{'name':<34} {'source':<9} {'arch':<8} {'params':>8} {'context':>8} {'KV/token':>9}  status"]
    for r in rows:
        params = _count(r.params) if r.params else "?"
        kv = _bytes(r.kv_bytes_per_token) if r.kv_bytes_per_token else "?"
        lines.append(f"{r.name:<34} {r.source:<9} {r.architecture:<8} {params:>8} {r.context or '?':>8} {kv:>9}  "
                     f"{r.status}")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _bytes(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} B"
