"""Decode-heavy engine throughput: long outputs at a KV memory the full cache cannot hold for every request at once.

Issue 14's second workload, beside :mod:`engine_throughput` (long prompts, short outputs): every request has a
1k-4k-token prompt and writes 2k-8k tokens (EOS ignored), so the cache grows mostly *while decoding* and what a
mode saves on the prompt alone matters little. Each mode gets the same queue, submitted at once, and the same KV
memory: quantized pages (``kivi4``, ``kivi2``, ``fp8``) hold more tokens per byte, prefill-time eviction
(``snapkv(keep=0.25)``) shrinks the prompt only, and decode-time budgets (R-KV, ``snapkv(decode_budget=...)``,
StreamingLLM's sliding window) hold every sequence at its budget however long it writes. A mode may also run with
length-aware admission (:mod:`kvslim.engine.admission`), which reserves each sequence's expected growth instead of
preempting (and recomputing) when the pool runs out. Per mode it reports output tokens/s and its ratio to the full
cache's in the same run, the most sequences decoded at once, preemptions, time to first token and inter-token
latency (p50, p99), and the KV bytes a request held at its peak against what a full cache needs for it.

On the GPU it builds a **random-weight** Llama-3.1-8B in bfloat16 (speed and memory, not quality). The defaults are
issue 14's mix (12 requests of 1-4k x 2-8k tokens in 1.5 GiB, budgets of 1024 tokens): every mode decodes until its
longest request ends (8k steps at most) and the full cache alone takes 6-8 minutes on an H200, so that mix is run a
few modes per call (``--append`` adds to one report). **The mix scaled to one call** (every mode, and length-aware
admission for the full cache and R-KV, in about 3.5-4 minutes on an H200 with the model build and the kernels'
compilation; run it under a 600 s limit: the JSON is rewritten after each mode) divides lengths and budgets by ~4:

    KVSLIM_COMMIT=SHA python benchmarks/decode_heavy.py --requests 16 \
      --min-prompt 256 --max-prompt 768 --min-output 640 --max-output 1152 --kv-memory 0.5 --max-num-seqs 64 \
      --modes full kivi4 kivi2 fp8_e4m3 'snapkv(keep=0.25)' 'rkv(budget=256,interval=32)' \
      'snapkv(keep=0.25,decode_budget=256,interval=32)' 'streaming(budget=256,sinks=4)' \
      --length-aware full 'rkv(budget=256,interval=32)' --out benchmarks/results/engine_speed_h200/decode_heavy.json

How it was sized: at these batches and contexts an 8B step is weight-bound (~6 ms; ~7 ms at 16 sequences), so
output tokens/s follow the sequences decoded at once. 0.5 GiB hold 4k full-cache tokens (128 KiB each) and every
request peaks at 0.9-1.9k, so the full cache decodes ~3 at a time; a 256-token budget (plus up to ``interval``
between evictions) holds ~13 in the same memory. A CPU replay of the scheduler with the same token capacities
(tiny-llama, 768-1280 outputs) took 4.7k decode steps at a mean batch of 3.2 for the full cache (21 preemptions),
7.4k at 2.0 with length-aware admission (none), and 1.6k at 9.3 for R-KV and streaming: ~2.9x fewer steps, so the 3x
question is answerable here (the budgets' steps are somewhat longer; the longest request's tail caps the ratio).
Expected on the H200: full ~25 s, full length-aware ~40 s, each budget ~10 s, kivi4/kivi2 ~17 s (their full-precision
rings, 25% of the memory, cap them at 8 sequences), fp8_e4m3 and snapkv(keep=0.25) (the prompt only) ~13 s.
SHA: ``git rev-parse HEAD`` of the checkout the code came from, not of the device's copy (``provenance.py``).

``--smoke`` runs a few short requests through ``tiny-llama`` on the CPU (the test suite runs it).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Any

import torch
from engine_throughput import (
    appended_to,
    benchmark_model,
    copy_bandwidth,
    decode_weight_bytes,
    drive,
    pool_fields,
    report_header,
    warm_up,
    workload,
)
from provenance import code_commit

from kvslim.engine import LLMEngine, SamplingParams
from kvslim.engine.latency import LatencyStats

MODES = ["full", "kivi4", "kivi2", "fp8_e4m3", "snapkv(keep=0.25)", "rkv(budget=1024,interval=64)",
         "snapkv(keep=0.25,decode_budget=1024,interval=64)", "streaming(budget=1024,sinks=4)"]
#: modes also run with length-aware admission: the full cache, which preempts without it, and the decode-time budget
#: expected to be fastest, whose growth admission caps at its budget (issue 17: with and without, same run)
LENGTH_AWARE = ["full", "rkv(budget=1024,interval=64)"]
#: ``--smoke``: tiny-llama on the CPU, budgets scaled to its short requests
SMOKE = {"model": "tiny-llama", "kv_memory": 0.001, "block_size": 32, "max_num_seqs": 16, "requests": 8,
         "min_prompt": 24, "max_prompt": 64, "min_output": 200, "max_output": 400,
         "modes": ["full", "kivi4(residual=32)", "kivi2(residual=32)", "fp8_e4m3", "snapkv(keep=0.25)",
                   "rkv(budget=64,interval=8)", "snapkv(keep=0.25,decode_budget=64,interval=8)",
                   "streaming(budget=64,sinks=4)"],
         "length_aware": ["full", "rkv(budget=64,interval=8)"]}


def output_lengths(n: int, low: int, high: int, seed: int) -> list[int]:
    rng = random.Random(f"outputs:{seed}")
    return [rng.randint(low, high) for _ in range(n)]


def run_mode(model: Any, mode: str, length_aware: bool, requests: list[tuple[list[int], SamplingParams]],
             args: argparse.Namespace, weights: int) -> dict[str, Any]:
    engine = LLMEngine(model, policy=mode, kv_memory=args.kv_memory, block_size=args.block_size,
                       max_num_seqs=args.max_num_seqs, length_aware=length_aware)
    engine.latency = LatencyStats(window=sum(p.max_tokens for _, p in requests))  # every token's latency counts
    run = drive(engine, requests, weights, f"{mode}{' length-aware' if length_aware else ''}")
    outputs = run.outputs
    produced = sum(o.stats["completion_tokens"] for o in outputs)
    decode_s = sum(t for t, _, _ in run.steps)
    peak = [o.stats["peak_kv_bytes"] for o in outputs]
    full = [o.stats["full_kv_bytes"] for o in outputs]
    result = {
        "mode": mode,
        "length_aware": length_aware,
        **pool_fields(engine),
        "wall_s": run.wall_s,
        "output_tokens": produced,
        "output_tokens_per_s": produced / run.wall_s,
        "max_running": run.max_running,
        "preemptions": engine.scheduler.preemptions,
        "prefill_s": run.prefill_s,
        "decode_s": decode_s,
        "decode_steps": len(run.steps),
        "mean_decode_batch": sum(n for _, n, _ in run.steps) / max(1, len(run.steps)),
        **engine.metrics().latency,  # ttft_p50_s, ttft_p99_s, itl_p50_s, itl_p99_s over every request and token
        "mean_peak_kv_bytes_per_request": statistics.fmean(peak),
        "mean_full_kv_bytes_per_request": statistics.fmean(full),
        "kv_bytes_vs_full": sum(peak) / sum(full),
    }
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Each result's output tokens/s over the full cache's (default admission) in the same report."""
    full = next((r for r in results if r["mode"] == "full" and not r["length_aware"]), None)
    for r in results:
        r["output_tokens_per_s_vs_full"] = r["output_tokens_per_s"] / full["output_tokens_per_s"] if full else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny-llama on the CPU with a few short requests (changes the defaults below)")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--kv-memory", type=float, default=1.5,
                        help="GiB of KV memory for every mode (ring rows included); 1.5 GiB hold 12k full-cache tokens "
                             "of Llama-3.1-8B: the longest request alone (4k + 8k), about two at once on average")
    parser.add_argument("--block-size", type=int, default=None, help="default: the engine's (16; KIVI 32)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--min-prompt", type=int, default=1024)
    parser.add_argument("--max-prompt", type=int, default=4096)
    parser.add_argument("--min-output", type=int, default=2048)
    parser.add_argument("--max-output", type=int, default=8192)
    parser.add_argument("--modes", nargs="*", default=None, help=f"policy specs (default: {' '.join(MODES)})")
    parser.add_argument("--length-aware", nargs="*", default=None,
                        help=f"modes also run with length-aware admission (default: {' '.join(LENGTH_AWARE)}; "
                             "a mode not in --modes is skipped)")
    parser.add_argument("--append", action="store_true", help="add the results to an existing --out of the same workload")
    parser.add_argument("--commit", default=None, help="git commit of the code (default: env KVSLIM_COMMIT, else git rev-parse HEAD)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_heavy.json"))
    if parser.parse_args(argv).smoke:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
    args.modes = args.modes or MODES
    args.length_aware = LENGTH_AWARE if args.length_aware is None else args.length_aware
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model, cuda = benchmark_model("decode_heavy", args.model, args.smoke)
    vocab = model.config.vocab_size
    prompts = workload(args.requests, args.min_prompt, args.max_prompt, vocab, seed=0)
    outputs = output_lengths(args.requests, args.min_output, args.max_output, seed=0)
    requests = [(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, outputs)]
    weights = decode_weight_bytes(model)
    commit = code_commit(args.commit)
    report = {
        **report_header("decode_heavy", args, cuda, commit, prompts),
        "output_tokens": outputs,
        "eos_ignored": True,
        "decode_weight_bytes": weights,
        "copy_bandwidth_bytes_per_s": copy_bandwidth() if cuda else None,
        "results": [],
    }
    if args.append:
        report = appended_to(args.out, report, ("commit", "model", "kv_memory_gib", "max_num_seqs", "prompt_tokens",
                                                "output_tokens"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = [(mode, False) for mode in args.modes] + [(mode, True) for mode in args.modes if mode in args.length_aware]
    for mode, length_aware in runs:
        if cuda:
            warm_up(model, mode, args)
        result = run_mode(model, mode, length_aware, requests, args, weights)
        report["results"].append(result)  # rewritten after each mode: a later failure keeps what was measured
        add_ratios(report["results"])
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps(result), flush=True)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
