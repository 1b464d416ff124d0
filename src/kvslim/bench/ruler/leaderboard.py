"""Aggregate RULER records into what the report shows, per protocol and length.

RULER's average is the mean over tasks of each task's mean score (x100); a method's *ratio* is its average
over full's on the same protocol and length. Losses are paired by sample: *lost* means full scored 1 and
the method less, *gained* the reverse. Output-length change is paired the same way. The engine's rows
(:func:`engine_rows`) pair its samples with the Hugging Face path's the same way: same answer or not.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
import math
from statistics import fmean
from typing import Any

from ..config import Run
from ..store import HF, key_of

FULL = "full"

Setting = tuple[str, int]  # (protocol, length)


def _label(record: dict[str, Any]) -> str:
    return Run(record["policy"], record["keep"]).label


def _groups(records: Iterable[dict[str, Any]], *fields: str) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        out[tuple(r[f] for f in fields)].append(r)
    return out


def settings(records: Sequence[dict[str, Any]]) -> list[Setting]:
    return sorted({(r["protocol"], r["length"]) for r in records}, key=lambda s: (s[1], s[0] != "query-aware"))


def task_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per protocol, length, policy run and task: mean score (x100), samples, mean output tokens."""
    rows = []
    for (protocol, length, policy, keep, task), group in _groups(
            records, "protocol", "length", "policy", "keep", "task").items():
        rows.append({"protocol": protocol, "length": length, "policy": policy, "keep": keep, "task": task,
                     "n": len(group), "score": 100 * fmean(r["score"] for r in group),
                     "output_tokens": fmean(r["output_tokens"] for r in group)})
    return rows


def board(records: Sequence[dict[str, Any]], runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per protocol, length and policy run: RULER average, ratio to full, tasks and samples counted,
    mean KV bytes held after the prompt (question included), their share of full's and mean compression, and the
    backend that generated its records (an engine run's refused policies ran through the Hugging Face path)."""
    per_task = _groups(task_rows(records), "protocol", "length", "policy", "keep")
    by_run = _groups(records, "protocol", "length", "policy", "keep")
    rows = []
    for protocol, length in settings(records):
        full = per_task.get((protocol, length, FULL, None))
        full_avg = fmean(t["score"] for t in full) if full else None
        full_records = by_run.get((protocol, length, FULL, None))
        full_bytes = fmean(r["kv_bytes_prefill"] for r in full_records) if full_records else None
        for run in runs:
            tasks = per_task.get((protocol, length, run.policy, run.keep))
            if not tasks:
                continue
            avg = fmean(t["score"] for t in tasks)
            group = by_run[(protocol, length, run.policy, run.keep)]
            compression = [r["compression"] for r in group if r["compression"]]
            kv_bytes = fmean(r["kv_bytes_prefill"] for r in group)
            rows.append({"protocol": protocol, "length": length, "policy": run.policy, "keep": run.keep,
                         "label": run.label, "backend": "+".join(sorted({r.get("backend", HF) for r in group})),
                         "score": avg, "ratio": avg / full_avg if full_avg else None,
                         "tasks": len(tasks), "n": len(group), "kv_bytes": kv_bytes,
                         "byte_share": kv_bytes / full_bytes if full_bytes else None,
                         "compression": fmean(compression) if compression else None})
    return rows


def placed(board_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that set their own memory (no keep: ``auto(tolerance=...)``, a quantizer), each beside the best-scoring
    run with a fixed keep that holds no more mean KV bytes on the same protocol and length: an adaptive budget
    against the best fixed one at equal (or fewer) mean bytes."""
    rows = []
    for r in board_rows:
        if r["keep"] is not None or r["policy"] == FULL:
            continue
        fixed = [f for f in board_rows if (f["protocol"], f["length"]) == (r["protocol"], r["length"])
                 and f["keep"] is not None and f["kv_bytes"] <= r["kv_bytes"]]
        best = max(fixed, key=lambda f: f["score"], default=None)
        rows.append({"protocol": r["protocol"], "length": r["length"], "label": r["label"], "score": r["score"],
                     "kv_bytes": r["kv_bytes"], "byte_share": r["byte_share"],
                     "fixed": best and best["label"], "fixed_score": best and best["score"],
                     "fixed_kv_bytes": best and best["kv_bytes"], "fixed_byte_share": best and best["byte_share"]})
    return rows


def losses(records: Sequence[dict[str, Any]], runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per protocol, length, non-full run and task: samples paired with full, ids lost and gained."""
    full = {(r["protocol"], r["length"], r["sample_id"]): r for r in records if r["policy"] == FULL}
    order = {(run.policy, run.keep): i for i, run in enumerate(runs)}
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        ref = full.get((r["protocol"], r["length"], r["sample_id"]))
        if r["policy"] == FULL or ref is None or (r["policy"], r["keep"]) not in order:
            continue
        key = (r["protocol"], r["length"], order[(r["policy"], r["keep"])], r["task"])
        row = out.setdefault(key, {"protocol": r["protocol"], "length": r["length"], "label": _label(r),
                                   "task": r["task"], "paired": 0, "lost": [], "gained": []})
        row["paired"] += 1
        if ref["score"] >= 1.0 > r["score"]:
            row["lost"].append(r["sample_id"])
        elif r["score"] >= 1.0 > ref["score"]:
            row["gained"].append(r["sample_id"])
    return [out[k] for k in sorted(out)]


def length_change(records: Sequence[dict[str, Any]], runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per protocol, length and non-full run: mean output tokens against full's on the same samples."""
    full = {(r["protocol"], r["length"], r["sample_id"]): r["output_tokens"] for r in records
            if r["policy"] == FULL}
    rows = []
    for protocol, length in settings(records):
        for run in runs:
            if run.policy == FULL:
                continue
            pairs = [(r["output_tokens"], full[(protocol, length, r["sample_id"])]) for r in records
                     if (r["protocol"], r["length"], r["policy"], r["keep"]) == (protocol, length, run.policy, run.keep)
                     and (protocol, length, r["sample_id"]) in full]
            if pairs:
                mine, ref = fmean(p for p, _ in pairs), fmean(f for _, f in pairs)
                rows.append({"protocol": protocol, "length": length, "label": run.label, "paired": len(pairs),
                             "output_tokens": mine, "full_output_tokens": ref,
                             "change": mine / ref - 1 if ref else None})
    return rows


def _average(records: Sequence[dict[str, Any]]) -> float:
    """RULER's average (0-100): the mean over tasks of each task's mean score."""
    return 100 * fmean(fmean(r["score"] for r in group) for group in _groups(records, "task").values())


def _percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (a value that occurred; no interpolation between two requests)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def engine_rows(engine: Sequence[dict[str, Any]], hf: Sequence[dict[str, Any]], runs: Sequence[Run]
                ) -> list[dict[str, Any]]:
    """One row per protocol, length and policy run the engine ran: its RULER average and, on the samples the
    Hugging Face path also ran, that path's average and the share of samples answered identically; then what
    it cost in serving: the most sequences running at once, output tokens per second over its batches (wall
    time, prefill included), time to first token (p50, p99, from submission), preemptions and the share of prompt
    tokens found in the prefix cache (full's prompts share their openings; an evicting method's blocks never do)."""
    reference = {key_of(r)[:-1]: r for r in hf}
    by_run = _groups(engine, "protocol", "length", "policy", "keep")
    rows = []
    for protocol, length in settings(engine):
        for run in runs:
            group = by_run.get((protocol, length, run.policy, run.keep))
            if not group:
                continue
            pairs = [(r, reference[key_of(r)[:-1]]) for r in group if key_of(r)[:-1] in reference]
            batches = list({r["engine_batch"]: r for r in group}.values())
            wall = sum(b["engine_wall_s"] for b in batches)
            ttft = [r["ttft_s"] for r in group if r["ttft_s"] is not None]
            rows.append({
                "protocol": protocol, "length": length, "policy": run.policy, "keep": run.keep, "label": run.label,
                "n": len(group), "score": _average(group), "paired": len(pairs),
                "hf_score": _average([h for _, h in pairs]) if pairs else None,
                "same_answer": fmean(e["output"] == h["output"] for e, h in pairs) if pairs else None,
                "max_running": max(b["engine_max_running"] for b in batches),
                "output_tok_s": sum(b["engine_output_tokens"] for b in batches) / wall if wall else None,
                "ttft_p50_s": _percentile(ttft, 0.5) if ttft else None,
                "ttft_p99_s": _percentile(ttft, 0.99) if ttft else None,
                "preemptions": sum(b["engine_preemptions"] for b in batches),
                "prefix_cached": sum(r["cached_prompt_tokens"] for r in group) / sum(r["prompt_tokens"] for r in group),
                "kv_memory_gib": sorted({b["kv_memory_gib"] for b in batches}),
            })
    return rows
