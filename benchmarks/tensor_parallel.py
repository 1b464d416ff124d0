"""Tensor-parallel engine throughput: a model no one GPU holds, at a fixed KV memory per GPU, full vs compressed.

Builds a **random-weight** Llama-3.1-70B-shaped model in bf16 over ``--tp`` GPUs (each rank draws only its
shard on its GPU, no download; the numbers measure speed and memory, not quality) and submits every request
at once, more than the full cache's pool holds, so the scheduler queues, admits as blocks free up and
preempts. For each policy it reports output tokens/s and the most sequences running at once; then, on an
eager (no CUDA graphs) engine decoding a fixed batch, the share of a decode step rank 0 spends in
all-reduces (two per layer plus the embedding's), from the profiler's NCCL kernel times (gloo's all-reduce
ops on the CPU).

    python benchmarks/tensor_parallel.py --out benchmarks/results/tensor_parallel_2xh200.json
    python benchmarks/tensor_parallel.py --policies kivi4 --share-steps 0 --out ...   # one policy per command

Every policy starts its own engine (2 processes, each drawing its 35B-parameter shard); expect minutes per
policy on 2 x H200 (64 prompts of 2k-6k tokens through a 70B prefill), so split the policies over commands
where a command's time is capped.
    python benchmarks/tensor_parallel.py --device cpu --model tiny-llama     # 2 gloo ranks, a smoke run
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from kvslim.engine import LLM, SamplingParams

POLICIES = ["full", "kivi4", "snapkv(keep=0.25)"]
#: workload defaults per device type: a saturating one for GPUs, a seconds-long smoke run for the CPU
DEFAULTS = {
    "cuda": {"kv_memory": 16.0, "requests": 64, "min_prompt": 2048, "max_prompt": 6144, "output_tokens": 128,
             "share_batch": 32, "share_prompt": 1024},
    "cpu": {"kv_memory": 0.002, "requests": 8, "min_prompt": 32, "max_prompt": 96, "output_tokens": 8,
            "share_batch": 4, "share_prompt": 32},
}


def workload(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(low, high))] for _ in range(n)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(args: argparse.Namespace, policy: str, enforce_eager: bool) -> LLM:
    return LLM(args.model, policy=policy, kv_memory=args.kv_memory, dtype=torch.bfloat16 if args.device == "cuda" else None,
               device=args.device, max_num_seqs=args.max_num_seqs, enforce_eager=enforce_eager,
               tensor_parallel_size=args.tp)


def warm_up(engine: LLM, vocab: int, length: int) -> None:
    """Compile kernels and capture CUDA graphs outside the timings: prompts long enough for KIVI to pack."""
    prompts = workload(2, length // 2, length, vocab, seed=1)
    engine.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))


def run_policy(args: argparse.Namespace, policy: str, prompts: list[list[int]], vocab: int) -> dict[str, Any]:
    engine = build(args, policy, args.enforce_eager)
    try:
        warm_up(engine, vocab, args.max_prompt)
        preempted = engine.scheduler.preemptions
        params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
        sync(args.device)
        start = time.perf_counter()
        ids = [engine.add_request(p, params) for p in prompts]
        max_running, prefill_s, decode_s, decode_steps, shown = 0, 0.0, 0.0, 0, start
        while engine.has_unfinished:
            if time.perf_counter() - shown > 30:
                shown, m = time.perf_counter(), engine.metrics()
                print(f"  {policy} {shown - start:.0f}s: {len(engine.finished)} finished, {m.running} running, "
                      f"{m.waiting} waiting", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            engine.step()  # sampling reads the tokens back, so the step has finished on every rank's device
            elapsed = time.perf_counter() - t0
            max_running = max(max_running, len(engine.scheduler.running))
            if engine.last_step_prefill:
                prefill_s += elapsed
            else:
                decode_s, decode_steps = decode_s + elapsed, decode_steps + 1
        sync(args.device)
        wall = time.perf_counter() - start
        outputs = [engine.finished.pop(i) for i in ids]
        produced = sum(o.stats["completion_tokens"] for o in outputs)
        return {
            "policy": engine.policy.spec,
            "block_size": engine.blocks.block_size,
            "kv_blocks": engine.blocks.num_blocks,
            "kv_block_bytes_per_gpu": engine.block_bytes,
            "kv_tokens_capacity": engine.blocks.num_blocks * engine.blocks.block_size,
            "wall_s": wall,
            "output_tokens": produced,
            "output_tokens_per_s": produced / wall,
            "max_running": max_running,
            "preemptions": engine.scheduler.preemptions - preempted,
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "decode_steps": decode_steps,
            "mean_decode_step_ms": decode_s / max(decode_steps, 1) * 1e3,
            "mean_peak_kv_bytes_per_request_per_gpu": sum(o.stats["peak_kv_bytes"] for o in outputs) / len(outputs),
        }
    finally:
        engine.close()


def all_reduce_us(event: Any, device: str) -> float:
    """Microseconds of an all-reduce in a profiler row: NCCL's kernels on GPUs, gloo's c10d op on the CPU; else 0."""
    if device == "cpu":
        return float(event.cpu_time_total) if event.key == "c10d::allreduce_" else 0.0
    name = event.key.lower().replace("_", "")
    if event.device_type != DeviceType.CUDA or "nccl" not in name or "allreduce" not in name:
        return 0.0
    return float(getattr(event, "device_time_total", None) or event.cuda_time_total)


def all_reduce_share(args: argparse.Namespace, vocab: int, steps: int) -> dict[str, Any]:
    """Rank 0's all-reduce time over its decode step time, ``steps`` eager steps of ``share_batch`` sequences.

    Eager, because kernels replayed inside a CUDA graph are not attributed reliably by the profiler; the share
    of a graph-replayed step is larger still, since graphs shrink the launch overhead, not the all-reduces.
    On NCCL the kernel time includes waiting for the slower rank, as a real step does.
    """
    engine = build(args, "full", enforce_eager=True)
    try:
        params = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
        for prompt in workload(args.share_batch, args.share_prompt, args.share_prompt, vocab, seed=2):
            engine.add_request(prompt, params)
        while engine.scheduler.waiting or engine.last_step_prefill:  # prefill them all, then one decode step
            engine.step()
        batch = len(engine.scheduler.running)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            sync(args.device)
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            sync(args.device)
            wall = time.perf_counter() - start
        reduce_us = sum(all_reduce_us(e, args.device) for e in prof.key_averages())
        while engine.has_unfinished:
            engine.step()
    finally:
        engine.close()
    return {"batch": batch, "steps": steps, "step_ms": wall / steps * 1e3, "all_reduce_ms_per_step": reduce_us / 1e3 / steps,
            "share": reduce_us / 1e6 / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-70b")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size (GPUs, or gloo ranks on the CPU)")
    parser.add_argument("--kv-memory", type=float, help="GiB of KV memory per GPU for every policy (GPU: 16, CPU: 0.002)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--min-prompt", type=int)
    parser.add_argument("--max-prompt", type=int)
    parser.add_argument("--output-tokens", type=int)
    parser.add_argument("--share-batch", type=int, help="sequences decoded at once while the all-reduce share is measured")
    parser.add_argument("--share-prompt", type=int, help="their prompt length")
    parser.add_argument("--policies", nargs="*", default=POLICIES)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="decode without CUDA graphs (each rank's graphs capture its all-reduces; this is the fallback)")
    parser.add_argument("--share-steps", type=int, default=5, help="decode steps profiled for the all-reduce share; 0: skip")
    parser.add_argument("--out", type=Path, help="JSON file (default: print it)")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and torch.cuda.device_count() < args.tp:
        raise SystemExit(f"--tp {args.tp} needs {args.tp} GPUs, {torch.cuda.device_count()} visible: --device cpu smoke-tests")
    if args.device == "cpu":
        torch.set_num_threads(1)  # the ranks share the CPU: one intra-op thread each
    from kvslim.models import load_config

    config = load_config(args.model)
    prompts = workload(args.requests, args.min_prompt, args.max_prompt, config.vocab_size, seed=0)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "benchmark": "tensor_parallel",
        "model": f"{args.model} architecture, {'RANDOM weights, bfloat16' if args.device == 'cuda' else 'as loaded'}",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "tensor_parallel_size": args.tp,
        "torch": torch.__version__,
        "commit": commit,
        "kv_memory_gib_per_gpu": args.kv_memory,
        "cuda_graphs": args.device == "cuda" and not args.enforce_eager,
        "workload": {"requests": args.requests, "prompt_tokens": [args.min_prompt, args.max_prompt],
                     "output_tokens": args.output_tokens, "max_num_seqs": args.max_num_seqs},
        "results": [],
    }
    for policy in args.policies:
        print(f"{policy}...", file=sys.stderr, flush=True)
        report["results"].append(run_policy(args, policy, prompts, config.vocab_size))
        print(json.dumps(report["results"][-1]), file=sys.stderr, flush=True)
    if args.share_steps:
        report["all_reduce"] = all_reduce_share(args, config.vocab_size, args.share_steps)
    text = json.dumps(report, indent=2)
    if args.out is None:
        print(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
