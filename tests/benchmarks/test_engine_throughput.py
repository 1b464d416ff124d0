"""benchmarks/engine_throughput.py runs end to end on the CPU (``--smoke``): every policy, chunked prefill beside."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def engine_throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # run as a script, it imports its siblings (timing, provenance)
    torch.set_num_threads(1)
    import engine_throughput

    return engine_throughput


def test_smoke_run_reports_every_policy_with_and_without_chunked_prefill(engine_throughput, tmp_path,
                                                                          monkeypatch) -> None:
    out = tmp_path / "engine_throughput.json"
    monkeypatch.setenv("KVSLIM_COMMIT", "c0ffee")
    report = engine_throughput.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["commit"] == "c0ffee"
    smoke = engine_throughput.SMOKE
    runs = {(r["mode"], r["chunked_prefill"]): r for r in report["results"]}
    assert set(runs) == {(p, False) for p in smoke["policies"]} | {(p, True) for p in smoke["chunked_prefill"]}
    for r in runs.values():
        assert r["output_tokens"] == report["requests"] * smoke["output_tokens"]  # EOS ignored
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and 0 < r["itl_p50_s"] <= r["itl_p99_s"]
        assert "decode_roofline_s" not in r  # no bandwidth measured on the CPU, so no roofline claimed
    assert runs["full", True]["max_num_batched_tokens"] == smoke["max_num_batched_tokens"]
    assert runs["full", False]["max_running"] < report["requests"]  # the smoke pool cannot hold every prompt at once
    assert runs["snapkv(keep=0.25)", False]["max_running"] == report["requests"]


def test_chunked_prefill_alone_means_every_policy(engine_throughput) -> None:
    args = engine_throughput.parse_args(["--policies", "full", "kivi4", "--chunked-prefill"])
    assert args.chunked_prefill == ["full", "kivi4"]
    assert engine_throughput.parse_args(["--policies", "full"]).chunked_prefill == []
