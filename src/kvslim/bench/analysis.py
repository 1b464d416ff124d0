"""Paired per-sample analysis: where a policy loses what the full cache gets right, and the reverse.

Accuracy alone hides *which* samples change; grouping flips by task, length and needle depth shows
whether a method fails at a particular position (e.g. a sliding window losing early needles).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .config import Run
from .metrics import FULL
from .tasks import get_task

DEPTH_BINS = 5


def depth_bin(depth: float | None) -> str | None:
    """Depths fall into equal-width bins labelled ``"0.2-0.4"``; the last bin includes 1.0."""
    if depth is None:
        return None
    i = min(int(depth * DEPTH_BINS), DEPTH_BINS - 1)
    return f"{i / DEPTH_BINS:.1f}-{(i + 1) / DEPTH_BINS:.1f}"


def depth_labeler(task: str) -> Callable[[float | None], str | None]:
    """Exact depths for tasks that place needles on a grid (needle's ``depths`` option), equal-width bins
    for tasks that draw depths at random (passkey, multikey), where exact values would not repeat."""
    if isinstance(get_task(task).options.get("depths"), list):
        return lambda d: None if d is None else f"{d:g}"
    return depth_bin


def flips(records: Iterable[dict[str, Any]], runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per non-full run and (task, length, depth bin): paired count, ids lost (full right, run wrong)
    and ids gained (run right, full wrong). Only groups with a flip are returned."""
    records = [r for r in records if r["correct"] is not None]
    full = {(r["task"], r["length"], r["sample_id"]): r for r in records if r["policy"] == FULL}
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    counts: dict[tuple[Any, ...], int] = defaultdict(int)
    order = {(run.policy, run.keep): i for i, run in enumerate(runs)}
    for r in records:
        ref = full.get((r["task"], r["length"], r["sample_id"]))
        if r["policy"] == FULL or ref is None or (r["policy"], r["keep"]) not in order:
            continue
        key = (order[(r["policy"], r["keep"])], r["task"], r["length"], depth_labeler(r["task"])(r["depth"]))
        counts[key] += 1
        if ref["correct"] == r["correct"]:
            continue
        group = groups.setdefault(key, {"lost": [], "gained": []})
        group["lost" if ref["correct"] else "gained"].append(r["sample_id"])
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3] or "")):
        run = runs[key[0]]
        out.append({"policy": run.policy, "keep": run.keep, "label": run.label, "task": key[1], "length": key[2],
                    "depth": key[3], "paired": counts[key], **groups[key]})
    return out
