"""benchmarks/throughput_table.py: one markdown row per run of either throughput benchmark's smoke output."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    torch.set_num_threads(1)
    import decode_heavy
    import engine_throughput
    import throughput_table

    return decode_heavy, engine_throughput, throughput_table


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def test_decode_heavy_table_has_a_row_per_run_and_ratios_to_the_plain_full_cache(scripts, tmp_path) -> None:
    decode_heavy, _, throughput_table = scripts
    out = tmp_path / "decode_heavy.json"
    report = decode_heavy.main(["--smoke", "--modes", "full", "streaming(budget=64,sinks=4)", "--length-aware", "full",
                                "--out", str(out)])
    lines = throughput_table.main([str(out)]).splitlines()
    rows = [cells(line) for line in lines[2:]]
    assert [r[0] for r in rows] == ["full", "streaming(budget=64,sinks=4)", "full length-aware"]
    assert rows[0][2] == "1.00"
    streaming = report["results"][1]
    assert float(rows[1][2]) == pytest.approx(streaming["output_tokens_per_s_vs_full"], abs=0.006)
    assert int(rows[1][3]) == streaming["max_running"] and int(rows[1][4]) == streaming["preemptions"]
    assert rows[1][5] == f"{streaming['ttft_p50_s'] * 1e3:.1f} / {streaming['ttft_p99_s'] * 1e3:.1f}"
    assert rows[1][7].endswith(f"({streaming['kv_bytes_vs_full']:.2f})")


def test_engine_throughput_table_labels_chunked_runs(scripts, tmp_path) -> None:
    _, engine_throughput, throughput_table = scripts
    out = tmp_path / "engine_throughput.json"
    engine_throughput.main(["--smoke", "--policies", "full", "snapkv(keep=0.25)", "--chunked-prefill", "full",
                            "--out", str(out)])
    rows = [cells(line) for line in throughput_table.main([str(out)]).splitlines()[2:]]
    assert [r[0] for r in rows] == ["full", "snapkv(keep=0.25)", "full chunked"]
    assert rows[0][2] == "1.00" and rows[2][2] != "-"
