"""The kvslim/kvpress comparison's own logic, without kvpress: the JSONL formats both sides share, the
agreement and kept-set overlap, recovering kept positions from a cache, the method pairs and the inputs
the orchestrator writes (benchmarks/kvpress_compare.py, kvpress_side.py, kvpress_agreement.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import kvpress_agreement as agreement
import kvpress_compare as compare
import kvpress_side as side
from bench.test_harness import char_tokenizer

from kvslim.methods import policy

SAMPLES = [{"id": "a", "task": "niah_single_1", "answers": ["123"], "metric": "string_match_all"},
           {"id": "b", "task": "niah_multivalue", "answers": ["1", "2"], "metric": "string_match_all"}]


def record(who: str, label: str, sample: str, ids: list[int], kept: list[list[list[int]]] | None = None,
           protocol: str = side.QUERY_AGNOSTIC) -> dict[str, Any]:
    out = {"side": who, "label": label, "protocol": protocol, "sample_id": sample, "output_ids": ids,
           "prefill_s": 1.0 if who == "kvslim" else 2.0, "decode_s_per_token": 0.1, "peak_mem_bytes": 100,
           "peak_mem_kind": "rss_peak"}
    if kept is not None:
        out["kept"], out["unmatched_keys"] = kept, 0
    return out


def text_of(ids: list[int]) -> str:
    return "".join(map(str, ids))


def score_of(text: str, sample: dict[str, Any]) -> float:
    return sum(a in text for a in sample["answers"]) / len(sample["answers"])


def test_agreement_pairs_scores_and_kept_overlap() -> None:
    ours = [record("kvslim", "snapkv", "a", [1, 2, 3], kept=[[[0, 1, 2, 3]], [[0, 1]]]),
            record("kvslim", "snapkv", "b", [1, 9]),
            record("kvslim", "knorm", "a", [7])]  # kvpress never ran knorm: left out, not an error
    theirs = [record("kvpress", "snapkv", "a", [1, 2, 3], kept=[[[0, 1, 4, 5]], [[0, 1]]]),
              record("kvpress", "snapkv", "b", [1, 2])]
    rows = agreement.pair_samples(SAMPLES, ours, theirs, text_of, score_of)
    assert [(r["label"], r["sample_id"]) for r in rows] == [("snapkv", "a"), ("snapkv", "b")]
    a, b = rows
    assert a["same_output"] and a["kvslim_score"] == a["kvpress_score"] == 1.0
    assert a["kept_jaccard_per_layer"] == [pytest.approx(2 / 6, abs=1e-4), 1.0]
    assert a["kvslim_kept_per_head"] == 3.0
    assert not b["same_output"] and (b["kvslim_score"], b["kvpress_score"]) == (0.5, 1.0) and not b["same_score"]
    assert "kept_jaccard" not in b
    pruned = [dict(r, unmatched_keys=3) if r.get("kept") else r for r in ours]  # keys changed: kept set unknown
    row = agreement.pair_samples(SAMPLES, pruned, theirs, text_of, score_of)[0]
    assert "kept_jaccard" not in row and row["kvslim_unmatched_keys"] == 3
    [summary] = agreement.summarise(rows)
    assert summary["n"] == 2 and summary["same_output"] == 0.5 and summary["same_score"] == 0.5
    assert summary["kvslim_score"] == 0.75 and summary["kvpress_score"] == 1.0
    assert summary["mean_abs_score_diff"] == 0.25
    assert summary["kvslim_prefill_s"] == 1.0 and summary["kvpress_prefill_s"] == 2.0
    assert summary["kept_samples"] == 1 and summary["kept_jaccard"] == pytest.approx((2 / 6 + 1) / 2, abs=1e-4)


def test_agreement_refuses_mixed_or_repeated_records() -> None:
    with pytest.raises(ValueError, match="kvpress' record among the kvslim"):
        agreement.index([record("kvpress", "full", "a", [1])], "kvslim")
    with pytest.raises(ValueError, match="two records"):
        agreement.index([record("kvslim", "full", "a", [1])] * 2, "kvslim")
    with pytest.raises(ValueError, match="different models"):
        agreement.kept_overlap([[[0]]], [[[0]], [[1]]])


def test_kept_positions_recovers_the_selection_from_held_keys() -> None:
    g = torch.Generator().manual_seed(1)
    full = [torch.randn(2, 50, 8, generator=g) for _ in range(2)]
    chosen = [[[0, 1, 2, 40, 49], [3, 7, 11]], [[5, 6], [0, 10, 20, 30]]]
    # held in score order (kvpress's topk), off by float noise (kvslim's attention path)
    held = [[full[l][h][torch.tensor(idx[::-1])] + 1e-7 for h, idx in enumerate(layer)] for l, layer in enumerate(chosen)]
    masked = [None, torch.zeros(2, 50, dtype=torch.bool)]
    masked[1][1, 10] = True  # a masking press (AdaKV) hides position 10 of head 1 although the key is held
    positions, unmatched = side.kept_positions(full, held, masked)
    assert positions == [[[0, 1, 2, 40, 49], [3, 7, 11]], [[5, 6], [0, 20, 30]]] and unmatched == 0
    altered = [[h * 0.5 for h in layer] for layer in held]  # changed keys (channel pruning) match nothing
    assert side.kept_positions(full, altered, [None, None])[1] == sum(len(i) for layer in chosen for i in layer)


def test_jsonl_and_protocol_ids(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    side.append_jsonl(path, {"a": 1})
    side.append_jsonl(path, {"b": [1, 2]})
    assert side.read_jsonl(path) == [{"a": 1}, {"b": [1, 2]}]
    sample = {"context_ids": [1, 2], "question_ids": [3]}
    assert side.compressed_ids(sample, side.QUERY_AGNOSTIC) == [1, 2]
    assert side.compressed_ids(sample, side.QUERY_AWARE) == [1, 2, 3]
    with pytest.raises(ValueError, match="unknown protocol"):
        side.compressed_ids(sample, "both")
    assert side.build_press(None, 0.75) is None  # the full control needs no kvpress
    assert "kvpress" not in sys.modules


def test_every_pair_builds_on_kvslim_and_names_a_press() -> None:
    for label, pair in compare.PAIRS.items():
        policy(pair.kvslim.format(keep=0.25))
        assert (pair.kvpress is None) == (label == "full")
        assert pair.kvpress is None or pair.kvpress["press"].endswith("Press")


def test_arguments_are_checked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for bad in (["--methods", "snapkv,h2o"], ["--keep", "1.5"], ["--protocols", "both"], ["--site", str(tmp_path / "no")]):
        with pytest.raises(SystemExit) as err:
            compare.parse_args(["--out", str(tmp_path), *bad])
        assert err.value.code == 2
    assert "unknown method label(s) ['h2o']" in capsys.readouterr().err
    args = compare.parse_args(["--out", str(tmp_path), "--device", "cpu"])
    assert args.dtype == "float32" and "snapkv@kvpress" in args.method_list


def test_inputs_are_what_the_kvpress_side_reads(tmp_path: Path) -> None:
    args = compare.parse_args(["--out", str(tmp_path), "--device", "cpu", "--tasks", "niah_single_1,vt",
                               "--length", "3000", "--samples", "2", "--kept-samples", "1", "--methods", "full,adakv"])
    samples = compare.write_inputs(args, tmp_path / "model", char_tokenizer(), [2])
    assert side.read_jsonl(tmp_path / side.SAMPLES) == samples
    assert [s["task"] for s in samples] == ["niah_single_1"] * 2 + ["vt"] * 2
    first = samples[0]
    assert len(first["context_ids"]) + len(first["question_ids"]) <= 3000 - first["max_new_tokens"]
    plan = json.loads((tmp_path / side.PLAN).read_text())
    assert plan["kept_samples"] == [0, 2] and plan["stop_ids"] == [2] and plan["keep"] == 0.25
    assert plan["methods"] == [{"label": "full", "kvpress": None},
                               {"label": "adakv", "kvpress": {"press": "AdaKVPress", "inner": {"press": "SnapKVPress", "kwargs": {}}}}]


def test_kvslim_kept_positions_on_a_real_cache() -> None:
    """StreamingLLM keeps the sinks and the newest tokens: the positions read off kvslim's cache say so."""
    args = argparse.Namespace(model="tiny-llama", dtype="float32", device="cpu", keep=0.25)
    kvslim = compare.KvslimSide(args, stops=[0])
    sample = {"context_ids": list(range(3, 35)), "question_ids": list(range(40, 48)), "max_new_tokens": 2}
    full = kvslim.full_keys(sample, side.QUERY_AWARE)
    kept, unmatched = kvslim.kept("streaming", sample, side.QUERY_AWARE, full)
    assert unmatched == 0 and len(kept) == len(full)
    assert all(head == [0, 1, 2, 3, 34, 35, 36, 37, 38, 39] for layer in kept for head in layer)
    out = kvslim.generate("streaming", sample, side.QUERY_AGNOSTIC)
    assert 1 <= len(out["output_ids"]) <= 2 and out["prefill_s"] > 0
