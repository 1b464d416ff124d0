"""The run directory's files, written so that an interrupted run leaves only valid files behind.

``samples.jsonl`` is appended one flushed line per finished sample: it is both the raw result and the
resume log (a rerun skips every key already in it). Summaries are written to a temporary file and
renamed into place, so a reader never sees half a ``summary.json``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

SAMPLES = "samples.jsonl"
CONFIG = "config.json"

HF = "hf"
"""The backend of records generated through ``kvslim.Cache`` (every record without a ``backend`` field)."""

Key = tuple[str, int, str, str, float | None, str | None, str]


def key_of(record: dict[str, Any]) -> Key:
    """What identifies a finished measurement: task, target length, sample id, policy spec, keep, the
    protocol that fed the question (RULER's suite runs two; other records have none) and the backend that
    generated it (``hf``, or RULER's ``engine``: both may share a run directory, to be compared)."""
    return (record["task"], record["length"], record["sample_id"], record["policy"], record["keep"],
            record.get("protocol"), record.get("backend", HF))


def _complete(raw: bytes) -> bytes:
    """The whole lines of a log: a kill during a write can leave a last line without its newline; it is dropped
    (that sample gets redone)."""
    return raw[: raw.rfind(b"\n") + 1]


def _parse(complete: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]


def read_shard(path: Path) -> list[dict[str, Any]]:
    """The finished records of a worker's own log (:mod:`kvslim.bench.ruler.workers`), which its parent appends to
    ``samples.jsonl`` before deleting it, so a run killed in between finds it again and appends it then."""
    return _parse(_complete(path.read_bytes()))


class SampleLog:
    """Append-only per-sample results; loads what an earlier (possibly killed) run finished. ``records`` maps
    each key to its latest line, so a redone sample supersedes the earlier one."""

    def __init__(self, out: Path, name: str = SAMPLES) -> None:
        self.path = out / name
        self.records: dict[Key, dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        complete = _complete(raw)
        if len(complete) != len(raw):
            self.path.write_bytes(complete)
        for record in _parse(complete):
            self.records[key_of(record)] = record

    def append(self, record: dict[str, Any]) -> None:
        self.extend([record])

    def extend(self, records: list[dict[str, Any]]) -> None:
        """Append a batch's records, one line each, synced to disk once (not once per line)."""
        with self.path.open("a") as f:
            f.write("".join(json.dumps(record) + "\n" for record in records))
            f.flush()
            os.fsync(f.fileno())
        for record in records:
            self.records[key_of(record)] = record

    def finished(self, runs: list[Any]) -> Callable[[Key], bool]:
        """Whether a key's line is done: only if it ran with today's full parameters. When a method's defaults
        change, its old lines are redone (the newer line wins) instead of being mixed into the summary."""
        specs = {(run.policy, run.keep): run.build().spec for run in runs}
        return lambda key: key in self.records and self.records[key]["policy_spec"] == specs[key[3:5]]


def check_config(out: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume into a directory whose results were measured under other settings."""
    path = out / CONFIG
    if not path.exists():
        return
    earlier = json.loads(path.read_text()).get("identity", {})
    changed = {k: (earlier.get(k), v) for k, v in identity.items() if earlier.get(k) != v}
    if changed:
        details = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
        raise ValueError(f"{out} holds results measured with other settings ({details}); use another --out")


def write_atomic(path: Path, text: str) -> None:
    """Write a sibling temporary file, then rename it over ``path`` (atomic within one file system)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2) + "\n")
