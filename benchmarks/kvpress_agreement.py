"""Per-sample agreement between kvslim's and kvpress's runs of the same method on the same samples.

Both sides write one record per (method label, protocol, sample) in the format of :mod:`kvpress_side`;
this module pairs them, decodes and scores both outputs the same way (one tokenizer, one metric, passed in),
and summarises each (label, protocol): both scores, how often the answers and the scores are the same,
prefill and decode time, peak memory, and, where both sides captured which positions they kept, the
overlap of the kept sets (Jaccard, per layer and overall), which says directly whether a disagreement
comes from a different selection or from what happens after it. Plain Python: the unit tests run it
without kvpress, torch or a model.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

SIDES = ("kvslim", "kvpress")
Key = tuple[str, str, str]  # label, protocol, sample id


def key_of(record: dict[str, Any]) -> Key:
    return record["label"], record["protocol"], record["sample_id"]


def index(records: Sequence[dict[str, Any]], side: str) -> dict[Key, dict[str, Any]]:
    """One side's records by key; a key seen twice is a ValueError (a run appended to an old file)."""
    out: dict[Key, dict[str, Any]] = {}
    for record in records:
        if record["side"] != side:
            raise ValueError(f"a {record['side']!r} record among the {side} records: keep each side's file apart")
        if key_of(record) in out:
            raise ValueError(f"{side}: two records for {key_of(record)}: delete the run directory and run again")
        out[key_of(record)] = record
    return out


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else 1.0


def kept_overlap(a: list[list[list[int]]], b: list[list[list[int]]]) -> list[float]:
    """Mean over KV heads of the Jaccard overlap of the kept positions, per layer."""
    if len(a) != len(b):
        raise ValueError(f"kept sets over {len(a)} and {len(b)} layers: the two sides ran different models")
    return [statistics.fmean(jaccard(x, y) for x, y in zip(la, lb)) for la, lb in zip(a, b)]


def pair_samples(samples: Sequence[dict[str, Any]], kvslim: Sequence[dict[str, Any]],
                 kvpress: Sequence[dict[str, Any]], text_of: Callable[[list[int]], str],
                 score_of: Callable[[str, dict[str, Any]], float]) -> list[dict[str, Any]]:
    """One row per key both sides ran: both outputs, scores and costs, and whether they agree.

    ``text_of`` turns output ids into the answer text (stop tokens dropped, one tokenizer for both sides);
    ``score_of(text, sample)`` is the sample's metric.
    """
    by_id = {s["id"]: s for s in samples}
    ours, theirs = index(kvslim, "kvslim"), index(kvpress, "kvpress")
    rows = []
    for key in sorted(ours.keys() & theirs.keys()):
        label, protocol, sample_id = key
        sample = by_id[sample_id]
        row: dict[str, Any] = {"label": label, "protocol": protocol, "sample_id": sample_id, "task": sample["task"]}
        for side, record in zip(SIDES, (ours[key], theirs[key])):
            text = text_of(record["output_ids"])
            row[f"{side}_output"] = text
            row[f"{side}_score"] = score_of(text, sample)
            for field in ("prefill_s", "decode_s_per_token", "peak_mem_bytes"):
                row[f"{side}_{field}"] = record[field]
            row[f"{side}_new_tokens"] = len(record["output_ids"])
        row["same_output"] = row["kvslim_output"].strip() == row["kvpress_output"].strip()
        row["same_score"] = row["kvslim_score"] == row["kvpress_score"]
        if "kept" in ours[key] and "kept" in theirs[key]:
            for side, record in zip(SIDES, (ours[key], theirs[key])):
                row[f"{side}_unmatched_keys"] = record["unmatched_keys"]
            # a held key that matches no prompt key (ThinK prunes key channels) leaves the kept set unknown
            if not row["kvslim_unmatched_keys"] and not row["kvpress_unmatched_keys"]:
                layers = kept_overlap(ours[key]["kept"], theirs[key]["kept"])
                row["kept_jaccard_per_layer"] = [round(x, 4) for x in layers]
                row["kept_jaccard"] = statistics.fmean(layers)
                for side, record in zip(SIDES, (ours[key], theirs[key])):
                    row[f"{side}_kept_per_head"] = statistics.fmean(len(h) for layer in record["kept"] for h in layer)
        rows.append(row)
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (label, protocol): mean scores, agreement rates, median times, largest peak memory, kept overlap."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["protocol"]), []).append(row)
    out = []
    for (label, protocol), group in sorted(groups.items()):
        entry: dict[str, Any] = {"label": label, "protocol": protocol, "n": len(group),
                                 "same_output": _mean(r["same_output"] for r in group),
                                 "same_score": _mean(r["same_score"] for r in group),
                                 "mean_abs_score_diff": _mean(abs(r["kvslim_score"] - r["kvpress_score"]) for r in group)}
        for side in SIDES:
            entry[f"{side}_score"] = _mean(r[f"{side}_score"] for r in group)
            entry[f"{side}_prefill_s"] = statistics.median(r[f"{side}_prefill_s"] for r in group)
            entry[f"{side}_decode_s_per_token"] = statistics.median(r[f"{side}_decode_s_per_token"] for r in group)
            entry[f"{side}_peak_mem_bytes"] = max(r[f"{side}_peak_mem_bytes"] for r in group)
        kept = [r for r in group if "kept_jaccard" in r]
        if kept:
            entry["kept_jaccard"] = _mean(r["kept_jaccard"] for r in kept)
            entry["kept_jaccard_per_layer"] = [round(statistics.fmean(col), 4)
                                               for col in zip(*(r["kept_jaccard_per_layer"] for r in kept))]
            entry["kept_samples"] = len(kept)
            for side in SIDES:
                entry[f"{side}_kept_per_head"] = _mean(r[f"{side}_kept_per_head"] for r in kept)
        out.append(entry)
    return out


def _mean(values: Any) -> float:
    return round(statistics.fmean(float(v) for v in values), 4)
