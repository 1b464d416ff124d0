"""benchmarks/decode_heavy.py runs end to end on the CPU (``--smoke``) and reports every field per mode."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def decode_heavy(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports engine_throughput's helpers as a sibling script
    torch.set_num_threads(1)
    import decode_heavy

    return decode_heavy


def test_smoke_run_reports_every_mode_with_and_without_length_aware_admission(decode_heavy, tmp_path,
                                                                             monkeypatch) -> None:
    out = tmp_path / "decode_heavy.json"
    monkeypatch.setenv("KVSLIM_COMMIT", "c0ffee")  # the device copy's git HEAD can be stale: the env var wins
    report = decode_heavy.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["commit"] == "c0ffee"
    runs = {(r["mode"], r["length_aware"]): r for r in report["results"]}
    assert set(runs) == ({(m, False) for m in decode_heavy.SMOKE["modes"]}
                         | {("full", True), ("rkv(budget=64,interval=8)", True)})
    for r in runs.values():
        assert r["output_tokens"] == sum(report["output_tokens"])  # EOS ignored: every request writes its length
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and 0 < r["itl_p50_s"] <= r["itl_p99_s"]
        assert r["output_tokens_per_s_vs_full"] == pytest.approx(
            r["output_tokens_per_s"] / runs["full", False]["output_tokens_per_s"])
    full, aware = runs["full", False], runs["full", True]
    assert full["preemptions"] > aware["preemptions"]  # the smoke pool cannot hold every request's output
    assert full["kv_bytes_vs_full"] == pytest.approx(1, abs=0.05)
    for mode in ("kivi4(residual=32)", "kivi2(residual=32)", "fp8_e4m3", "rkv(budget=64,interval=8)",
                 "snapkv(keep=0.25,decode_budget=64,interval=8)", "streaming(budget=64,sinks=4)"):
        assert runs[mode, False]["kv_bytes_vs_full"] < 0.5  # compressed or held at a budget while writing
        assert runs[mode, False]["max_running"] == report["requests"]  # all at once where full could not


def test_append_refuses_another_workload(decode_heavy, tmp_path) -> None:
    out = tmp_path / "decode_heavy.json"
    decode_heavy.main(["--smoke", "--modes", "full", "--length-aware", "--out", str(out)])
    with pytest.raises(SystemExit, match="another workload"):
        decode_heavy.main(["--smoke", "--modes", "fp8_e4m3", "--requests", "3", "--append", "--out", str(out)])
