"""Models already in the local Hugging Face cache, found offline.

``--model Qwen/Qwen2.5-7B-Instruct`` is served from ``$HF_HOME/hub`` when a snapshot with a config is
there; nothing here ever opens a network connection (``local_files_only``), so a model that is not
cached is a one-line error saying where kvslim looked and how to put the model there.
"""
from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants, scan_cache_dir, snapshot_download
from huggingface_hub.errors import CacheNotFound, LocalEntryNotFoundError

#: ``owner/name`` as the hub spells repository ids
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def hub_cache() -> Path:
    """The hub cache directory as huggingface_hub resolves it now (HF_HUB_CACHE, else HF_HOME/hub)."""
    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str) -> Path:
    """The local snapshot directory of ``repo_id``; raises ``ValueError`` (one line) when it is not cached."""
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=hub_cache()))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        path = None
    if path is None or not (path / "config.json").is_file():
        raise ValueError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({hub_cache()}; set HF_HOME to look elsewhere): "
            f"on a machine with network run `hf download {repo_id}` and copy that cache here, "
            "or pass the model's directory (config.json, weights, tokenizer files)"
        )
    return path


def cached_models() -> list[tuple[str, Path]]:
    """(repo id, snapshot directory) of every cached model repository that has a config.json."""
    try:
        info = scan_cache_dir(hub_cache())
    except (CacheNotFound, OSError):
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        snapshots = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        for revision in snapshots:
            if (revision.snapshot_path / "config.json").is_file():
                found.append((repo.repo_id, revision.snapshot_path))
                break
    return found
