"""benchmarks/hf_decode.py --smoke: every cache of the side-by-side decode benchmark runs and reports a time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_reports_every_cache(tmp_path):
    out = tmp_path / "hf_decode.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hf_decode.py"), "--smoke", "--contexts", "96",
                           "--steps", "3", "--warmup", "1", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]["96"]
    expected = {"DynamicCache", "StaticCache", "engine:full"} | {
        f"kvslim:{p}{mode}" for p in ("full", "snapkv(keep=0.25)", "kivi4", "kivi2") for mode in ("", " static")}
    assert set(rows) == expected
    assert all(isinstance(ms, float) and ms > 0 for ms in rows.values()), rows
