"""Engine throughput at a fixed KV memory: full cache vs StreamingLLM and SnapKV (keep 0.25), and HF generate.

Builds a **random-weight** Llama-3.1-8B-shaped model in bf16 on the GPU (no download; the numbers
measure speed and memory, not quality), serves requests of 8k-32k prompt tokens x 256 output tokens
(EOS ignored) through the engine for each policy, and runs the same requests one at a time through
Hugging Face ``generate`` with a DynamicCache. Writes one JSON file.

    python benchmarks/engine_throughput.py --kv-memory 12 --requests 12 --out benchmarks/results/engine_throughput.json
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from kvslim.engine import LLMEngine, SamplingParams
from kvslim.models import load_model

POLICIES = ["full", "streaming(keep=0.25)", "snapkv(keep=0.25)"]


def workload(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(low, high))] for _ in range(n)]


def run_engine(model: Any, policy: str, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    engine = LLMEngine(model, policy=policy, kv_memory=args.kv_memory, block_size=args.block_size)
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    max_running, steps = 0, 0
    while engine.has_unfinished:
        engine.step()
        steps += 1
        max_running = max(max_running, len(engine.scheduler.running))
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    outputs = [engine.finished.pop(i) for i in ids]
    produced = sum(o.stats["completion_tokens"] for o in outputs)
    result = {
        "policy": engine.policy.spec,
        "kv_blocks": engine.blocks.num_blocks,
        "kv_tokens_capacity": engine.blocks.num_blocks * args.block_size,
        "wall_s": wall,
        "output_tokens": produced,
        "output_tokens_per_s": produced / wall,
        "total_tokens_per_s": (produced + sum(map(len, prompts))) / wall,
        "max_running": max_running,
        "steps": steps,
        "preemptions": engine.scheduler.preemptions,
        "mean_ttft_s": sum(o.stats["ttft_s"] for o in outputs) / len(outputs),
        "mean_peak_kv_bytes_per_request": sum(o.stats["peak_kv_bytes"] for o in outputs) / len(outputs),
        "mean_full_kv_bytes_per_request": sum(o.stats["full_kv_bytes"] for o in outputs) / len(outputs),
    }
    del engine
    torch.cuda.empty_cache()
    return result


@torch.inference_mode()
def run_hf(model: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Hugging Face generate, DynamicCache, one request at a time (its batching pads to the longest prompt)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    produced = 0
    for prompt in prompts:
        ids = torch.tensor([prompt], device="cuda")
        out = model.generate(ids, max_new_tokens=args.output_tokens, min_new_tokens=args.output_tokens,
                             do_sample=False, past_key_values=DynamicCache(config=model.config))
        produced += out.shape[1] - ids.shape[1]
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"policy": "hf-generate-dynamiccache", "wall_s": wall, "output_tokens": produced,
            "output_tokens_per_s": produced / wall,
            "total_tokens_per_s": (produced + sum(map(len, prompts))) / wall, "max_running": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--kv-memory", type=float, default=12.0, help="GiB of KV pool for every policy")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--min-prompt", type=int, default=8192)
    parser.add_argument("--max-prompt", type=int, default=32768)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--policies", nargs="+", default=POLICIES)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--commit", default=None, help="git commit of the code (recorded in the JSON)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_throughput.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("engine_throughput needs a CUDA GPU")
    model, _ = load_model(args.model, dtype=torch.bfloat16, device="cuda")
    prompts = workload(args.requests, args.min_prompt, args.max_prompt, model.config.vocab_size, seed=0)
    # warm-up: compile the Triton kernel and CUDA kernels outside the timings
    run_engine(model, "full", [prompts[0][:512]], argparse.Namespace(**{**vars(args), "output_tokens": 4}))
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "benchmark": "engine_throughput",
        "model": f"{args.model} architecture, RANDOM weights, bfloat16",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "kv_memory_gib": args.kv_memory,
        "block_size": args.block_size,
        "requests": args.requests,
        "prompt_tokens": [len(p) for p in prompts],
        "output_tokens_per_request": args.output_tokens,
        "eos_ignored": True,
        "results": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = [lambda p=p: run_engine(model, p, prompts, args) for p in args.policies]
    if not args.skip_hf:
        runs.append(lambda: run_hf(model, prompts, args))
    for run in runs:  # the file is rewritten after each run, so a later failure keeps what was measured
        report["results"].append(run())
        print(json.dumps(report["results"][-1]), flush=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
