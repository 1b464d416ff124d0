"""Aggregate per-sample records into summary rows: one per task x policy run (and per length).

Output-length change is paired: a policy's mean output length over the samples that the full cache
also ran, against full's mean over those same samples, so a partial (interrupted) run compares like
with like.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from statistics import fmean
from typing import Any

from .config import Run

FULL = "full"

COLUMNS = [
    "task", "length", "policy", "keep", "n", "accuracy", "perplexity", "output_tokens", "output_change_vs_full",
    "kv_bytes_prefill", "kv_bytes_end", "kv_device_bytes_end", "kv_host_bytes_end", "full_bytes", "compression",
    "peak_tokens_per_head", "ttft_s", "tpot_s", "tokens_per_s",
    "peak_mem_bytes", "peak_mem_kind",
]


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return fmean(kept) if kept else None


def _row(records: Sequence[dict[str, Any]], full: dict[tuple[str, int, str], dict[str, Any]]) -> dict[str, Any]:
    first = records[0]
    scored = [r for r in records if r["scored_tokens"]]
    paired = [(r["output_tokens"], full[_sample(r)]["output_tokens"]) for r in records if _sample(r) in full]
    full_mean = fmean(f for _, f in paired) if paired else 0
    end = fmean(r["kv_bytes_end"] for r in records)
    gen_s = sum(r["gen_s"] for r in records)
    return {
        "task": first["task"], "policy": first["policy"], "keep": first["keep"], "n": len(records),
        "accuracy": _mean(r["score"] for r in records),
        "perplexity": math.exp(sum(r["nll_sum"] for r in scored) / sum(r["scored_tokens"] for r in scored))
        if scored else None,
        "output_tokens": fmean(r["output_tokens"] for r in records),
        # perplexity feeds a fixed continuation: there is no output length to change
        "output_change_vs_full": fmean(p for p, _ in paired) / full_mean - 1 if full_mean and not scored else None,
        "kv_bytes_prefill": fmean(r["kv_bytes_prefill"] for r in records),
        "kv_bytes_end": end,
        "kv_device_bytes_end": _mean(r.get("kv_device_bytes_end") for r in records),  # absent in older runs' records
        "kv_host_bytes_end": _mean(r.get("kv_host_bytes_end") for r in records),
        "full_bytes": fmean(r["full_bytes"] for r in records),
        "compression": fmean(r["full_bytes"] for r in records) / end if end else None,
        # the most any sample's layer and KV head held while generating (absent in older runs' records)
        "peak_tokens_per_head": max((r["peak_tokens_per_head"] for r in records
                                     if r.get("peak_tokens_per_head") is not None), default=None),
        "ttft_s": fmean(r["ttft_s"] for r in records),
        "tpot_s": fmean(r["tpot_s"] for r in records),
        "tokens_per_s": sum(r["output_tokens"] for r in records) / gen_s if gen_s > 0 else None,
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in records),
        "peak_mem_kind": first["peak_mem_kind"],
    }


def _sample(record: dict[str, Any]) -> tuple[str, int, str]:
    return record["task"], record["length"], record["sample_id"]


def summarize(records: Iterable[dict[str, Any]], tasks: Sequence[str], runs: Sequence[Run],
              by_length: bool = False) -> list[dict[str, Any]]:
    """Summary rows in task order, then run order; ``by_length`` splits each row by target length
    (``length`` is ``None`` in the pooled rows)."""
    records = list(records)
    full = {_sample(r): r for r in records if r["policy"] == FULL}
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["length"] if by_length else None, r["policy"], r["keep"])].append(r)
    lengths = sorted({r["length"] for r in records}) if by_length else [None]
    rows = []
    for task in tasks:
        for length in lengths:
            for run in runs:
                group = groups.get((task, length, run.policy, run.keep))
                if group:
                    rows.append({**_row(group, full), "length": length})
    return [{c: row[c] for c in COLUMNS} for row in rows]
