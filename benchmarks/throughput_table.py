"""A markdown table from an engine_throughput.py or decode_heavy.py JSON, for pasting into a results README.

    python benchmarks/throughput_table.py benchmarks/results/decode_heavy_h200.json

One row per run: the mode as given on the command line (``length-aware`` / ``chunked`` appended where the run used
them), output tokens/s and its ratio to the plain full cache's run in the same file, the most sequences decoded at
once, preemptions, time to first token and inter-token latency (p50 / p99, ms), and the mean KV bytes a request held
at its peak (MiB) with its ratio to the full cache's bytes for the same request.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HEADER = ("| mode | output tok/s | x full | max running | preemptions | TTFT p50 / p99 ms | ITL p50 / p99 ms "
          "| peak KV MiB / request (x full) |\n|---|---|---|---|---|---|---|---|")


def label(run: dict[str, Any]) -> str:
    """The mode as given (older engine_throughput files hold only the expanded ``policy``) and how it was admitted."""
    flags = [name for name, key in (("length-aware", "length_aware"), ("chunked", "chunked_prefill")) if run.get(key)]
    return " ".join([run.get("mode") or run["policy"], *flags])


def baseline(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The full cache's run with the default admission and whole-prompt prefill, which every ratio divides by."""
    return next((r for r in runs if r.get("policy") == "full" and not r.get("length_aware")
                 and not r.get("chunked_prefill")), None)


def pair(run: dict[str, Any], key: str) -> str:
    """``p50 / p99`` of a latency in ms; "-" where the file predates the engine's latency stats."""
    if f"{key}_p50_s" not in run:
        return "-"
    return f"{run[f'{key}_p50_s'] * 1e3:.1f} / {run[f'{key}_p99_s'] * 1e3:.1f}"


def row(run: dict[str, Any], full: dict[str, Any] | None) -> str:
    ratio = f"{run['output_tokens_per_s'] / full['output_tokens_per_s']:.2f}" if full else "-"
    if run.get("policy") == "hf-generate-dynamiccache":
        return f"| HF generate, DynamicCache, one at a time | {run['output_tokens_per_s']:.1f} | {ratio} | 1 | - | - | - | - |"
    peak = run["mean_peak_kv_bytes_per_request"]
    return (f"| {label(run)} | {run['output_tokens_per_s']:.1f} | {ratio} | {run['max_running']} | {run['preemptions']} "
            f"| {pair(run, 'ttft')} | {pair(run, 'itl')} "
            f"| {peak / 2**20:.4g} ({peak / run['mean_full_kv_bytes_per_request']:.2f}) |")


def table(report: dict[str, Any]) -> str:
    full = baseline(report["results"])
    return "\n".join([HEADER, *(row(r, full) for r in report["results"])])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a JSON written by engine_throughput.py or decode_heavy.py")
    text = table(json.loads(parser.parse_args(argv).report.read_text()))
    print(text)
    return text


if __name__ == "__main__":
    main()
