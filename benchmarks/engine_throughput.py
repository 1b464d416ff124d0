"""Engine throughput at a fixed KV memory that cannot hold every request at once: full cache vs compressed.

Builds a **random-weight** Llama-3.1-8B-shaped model in bf16 on the GPU (no download; the numbers
measure speed and memory, not quality) and submits every request at once: by default 48 requests of
8k-32k prompt tokens x 256 output tokens (EOS ignored), far more than a 12 GiB full-precision pool
holds, so the scheduler queues, admits as blocks free up and preempts. For each policy it reports
tokens/s, the most sequences running at once, preemptions, and how prefill and decode split the time.
Every decode step is also set against its roofline: the bytes it must read (the weights once, plus
every running sequence's KV blocks and ring rows) over the device-to-device copy bandwidth measured
in the same run. Hugging Face ``generate`` with its default DynamicCache runs a few of the same
requests one at a time, for its per-request throughput.

Latency: every run reports time to first token (TTFT, from submission, queueing included) and
inter-token latency (ITL) p50/p99 as the engine records them. ``--chunked-prefill`` runs prompts in
chunks beside the decode steps (``--max-num-batched-tokens`` per step), so ITL p99 no longer includes
whole 8k-32k prefills; runs with and without it in one call (below) compare the two.

    python benchmarks/engine_throughput.py --out benchmarks/results/engine_throughput_h100_saturated.json
    python benchmarks/engine_throughput.py --policies kivi4 kivi2 --append --out ...   # a second call adds results

``--chunked-prefill POLICY...`` runs those policies a second time with chunks (the flag alone: every policy), so one
call holds both. Issue 14's prompt-heavy table in **one H200 call of about 3 minutes** (model build and kernel
compilation included; 600 s limit, the JSON rewritten after each run): 16 requests of 4-16k prompt tokens x 256
output tokens in 4 GiB (32k full-cache tokens: the full cache holds ~3 prompts at once), every policy, the three
whose prompts chunk (pages in the model dtype) also chunked:

    KVSLIM_COMMIT=SHA python benchmarks/engine_throughput.py --requests 16 \
      --min-prompt 4096 --max-prompt 16384 --output-tokens 256 --kv-memory 4 --max-num-seqs 16 --hf-requests 0 \
      --policies full kivi4 kivi2 fp8_e4m3 'snapkv(keep=0.25)' 'rkv(keep=0.25,interval=64)' \
      --chunked-prefill full 'snapkv(keep=0.25)' 'rkv(keep=0.25,interval=64)' \
      --out benchmarks/results/engine_speed_h200/prompt_heavy.json

Sizing: 164k prompt tokens a run, ~6-8 s of prefill at ~26k tokens/s (chunked somewhat slower); the full cache then
decodes 16 x 256 tokens ~3 at a time (~1.4k steps of ~7.5 ms, ~10 s), the compressed policies 3-4x as many at once
(2-4 s): ~17 s for full, 9-12 s for each other run, nine runs. ``--smoke`` runs tiny-llama on the CPU (the tests).
SHA: ``git rev-parse HEAD`` of the checkout the code came from (see ``provenance.py``: the device copy's git is
stale, so ``$(git rev-parse HEAD)`` there records the wrong commit).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from provenance import code_commit
from timing import copy_bandwidth
from transformers import DynamicCache

from kvslim.engine import LLMEngine, RequestOutput, SamplingParams
from kvslim.hf_compat import cache_arg
from kvslim.models import load_model

POLICIES = ["full", "kivi4", "kivi2", "fp8_e4m3", "snapkv(keep=0.25)", "rkv(keep=0.25,interval=64)"]
#: the policies whose prompts the engine prefills in chunks (pages in the model dtype), run with and without
CHUNKED = ["full", "snapkv(keep=0.25)", "rkv(keep=0.25,interval=64)"]
#: ``--smoke``: tiny-llama on the CPU, a pool that holds a few of its short prompts at once
SMOKE = {"model": "tiny-llama", "kv_memory": 0.0006, "max_num_seqs": 8, "requests": 8, "min_prompt": 64,
         "max_prompt": 256, "output_tokens": 24, "hf_requests": 0,
         "policies": ["full", "kivi4(residual=32)", "kivi2(residual=32)", "fp8_e4m3", "snapkv(keep=0.25)",
                      "rkv(keep=0.25,interval=8)"],
         "chunked_prefill": ["full", "snapkv(keep=0.25)", "rkv(keep=0.25,interval=8)"], "max_num_batched_tokens": 96}


def workload(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(low, high))] for _ in range(n)]


def appended_to(out: Path, report: dict[str, Any], same: tuple[str, ...]) -> dict[str, Any]:
    """``--append``: the report already in ``out``, after checking it ran the same workload (the ``same`` fields) as
    ``report``, so results of two calls compare; exits naming the fields otherwise."""
    previous = json.loads(out.read_text())
    if any(previous[k] != report[k] for k in same):
        raise SystemExit(f"--append: {out} holds another workload or commit; compare {', '.join(same)}")
    return previous


def decode_weight_bytes(model: Any) -> int:
    """Parameter bytes one decode step reads: all of them but the input embedding (a gather of B rows)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    tied = embed.data_ptr() == model.lm_head.weight.data_ptr()
    return total if tied else total - embed.numel() * embed.element_size()


def kv_bytes_read(engine: LLMEngine, seqs: list[Any]) -> int:
    """KV bytes a decode step over ``seqs`` reads: each one's blocks (whole) and the ring tokens it holds."""
    kv = engine.runner.kv
    ring_token = kv.row_bytes // kv.capacity if kv.quantized else 0
    return sum(engine.blocks.held(s) * engine.block_bytes + (int(s.tail.max()) * ring_token if s.tail is not None else 0)
               for s in seqs)


def sync(device: torch.device) -> None:
    """Wait for the device, so wall-clock times cover the work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Drive:
    """What running a queue of requests to the end took: wall time, the prefill and decode steps."""

    outputs: list[RequestOutput]
    wall_s: float
    prefill_s: float
    steps: list[tuple[float, int, int]]  # per decode step: seconds, sequences, bytes read (weights + KV)
    max_running: int


def drive(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]], weights: int, label: str) -> Drive:
    """Submit every request at once, step the engine until all have finished, time prefill and decode steps apart."""
    device = engine.runner.device
    sync(device)
    start = time.perf_counter()
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    max_running, prefill_s, steps, shown = 0, 0.0, [], start
    while engine.has_unfinished:
        if time.perf_counter() - shown > 30:
            shown, m = time.perf_counter(), engine.metrics()
            print(f"  {label} {shown - start:.0f}s: {len(engine.finished)} finished, {m.running} running, {m.waiting} waiting, "
                  f"{m.preemptions} preemptions", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        done = engine.step()  # sampling reads the tokens back, so the step has finished on the device
        now = time.perf_counter()
        max_running = max(max_running, len(engine.scheduler.running))
        if engine.last_step_prefill:  # with chunked prefill, also the steps that decode beside a chunk
            prefill_s += now - t0
        elif done:
            seqs = [seq for seq, _ in done]
            steps.append((now - t0, len(seqs), weights + kv_bytes_read(engine, seqs)))
    sync(device)
    wall = time.perf_counter() - start
    return Drive([engine.finished.pop(i) for i in ids], wall, prefill_s, steps, max_running)


def run_engine(model: Any, policy: str, chunked: bool, prompts: list[list[int]], args: argparse.Namespace,
               bandwidth: float | None, weights: int) -> dict[str, Any]:
    """One policy's run over the whole queue; ``bandwidth`` None (the CPU smoke run): no roofline fields."""
    engine = LLMEngine(model, policy=policy, kv_memory=args.kv_memory, block_size=args.block_size,
                       max_num_seqs=args.max_num_seqs, chunked_prefill=chunked,
                       max_num_batched_tokens=args.max_num_batched_tokens if chunked else None)
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
    run = drive(engine, [(p, params) for p in prompts], weights, f"{policy}{' chunked' if chunked else ''}")
    wall, outputs, steps, prefill_s = run.wall_s, run.outputs, run.steps, run.prefill_s
    produced = sum(o.stats["completion_tokens"] for o in outputs)
    decode_s = sum(t for t, _, _ in steps)
    median_step = sorted(steps)[len(steps) // 2]
    latency = engine.metrics().latency
    result = {
        "mode": policy,
        **pool_fields(engine),
        "chunked_prefill": chunked,
        "max_num_batched_tokens": engine.scheduler.token_budget,
        "wall_s": wall,
        "output_tokens": produced,
        "output_tokens_per_s": produced / wall,
        "total_tokens_per_s": (produced + sum(map(len, prompts))) / wall,
        "max_running": run.max_running,
        "preemptions": engine.scheduler.preemptions,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_steps": len(steps),
        "mean_decode_batch": sum(n for _, n, _ in steps) / len(steps),
        "decode_output_tokens_per_s": sum(n for _, n, _ in steps) / decode_s,
        "median_decode_step": {"batch": median_step[1], "ms": median_step[0] * 1e3, "bytes": median_step[2]},
        "mean_ttft_s": sum(o.stats["ttft_s"] for o in outputs) / len(outputs),
        **latency,  # ttft_p50_s, ttft_p99_s, itl_p50_s, itl_p99_s
        "mean_peak_kv_bytes_per_request": sum(o.stats["peak_kv_bytes"] for o in outputs) / len(outputs),
        "mean_full_kv_bytes_per_request": sum(o.stats["full_kv_bytes"] for o in outputs) / len(outputs),
    }
    if bandwidth is not None:
        roofline_s = sum(b for _, _, b in steps) / bandwidth
        result.update(copy_bandwidth_bytes_per_s=bandwidth, decode_roofline_s=roofline_s,
                      decode_roofline_fraction=roofline_s / decode_s)
        result["median_decode_step"]["roofline_ms"] = median_step[2] / bandwidth * 1e3
    del engine
    torch.cuda.empty_cache()
    return result


def pool_fields(engine: LLMEngine) -> dict[str, Any]:
    """The policy and the KV pool it ran in: blocks, their bytes, the tokens they hold, the residual ring."""
    return {
        "policy": engine.policy.spec,
        "block_size": engine.blocks.block_size,
        "kv_blocks": engine.blocks.num_blocks,
        "kv_block_bytes": engine.block_bytes,
        "kv_tokens_capacity": engine.blocks.num_blocks * engine.blocks.block_size // engine.blocks.heads,
        "ring_rows": engine.blocks.rows,
        "ring_bytes": engine.blocks.rows * engine.runner.kv.row_bytes,
    }


@torch.inference_mode()
def run_hf(model: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Hugging Face generate, DynamicCache, one request at a time (its batching pads to the longest prompt)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    produced, per_request = 0, []
    for prompt in prompts:
        ids = torch.tensor([prompt], device="cuda")
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.output_tokens, min_new_tokens=args.output_tokens,
                             do_sample=False, **cache_arg(DynamicCache(config=model.config)))
        torch.cuda.synchronize()
        new = out.shape[1] - ids.shape[1]
        per_request.append({"prompt_tokens": len(prompt), "output_tokens": new, "s": time.perf_counter() - t0,
                            "output_tokens_per_s": new / (time.perf_counter() - t0)})
        produced += new
    wall = time.perf_counter() - start
    return {"policy": "hf-generate-dynamiccache", "requests": len(prompts), "wall_s": wall, "output_tokens": produced,
            "output_tokens_per_s": produced / wall, "total_tokens_per_s": (produced + sum(map(len, prompts))) / wall,
            "max_running": 1, "per_request": per_request}


def warm_up(model: Any, policy: str, args: argparse.Namespace, chunked: bool = False) -> None:
    """Compile the policy's kernels outside the timings: a prompt long enough for KIVI to pack, at prefill and decoding
    (``chunked``: in chunks beside the decode steps, which run other kernels than a whole-prompt prefill)."""
    engine = LLMEngine(model, policy=policy, kv_memory=0.5, block_size=args.block_size, max_num_seqs=4,
                       chunked_prefill=chunked, max_num_batched_tokens=256 if chunked else None)
    vocab = model.get_input_embeddings().num_embeddings
    prompt = [1 + i % (vocab - 1) for i in range(512)]
    for p in (prompt, prompt[:300]):
        engine.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True))
    while engine.has_unfinished:
        engine.step()
    del engine
    torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny-llama on the CPU with a few short requests (changes the defaults below)")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--kv-memory", type=float, default=12.0, help="GiB of KV memory for every policy (ring rows included)")
    parser.add_argument("--block-size", type=int, default=None, help="default: the engine's (16; KIVI 32)")
    parser.add_argument("--max-num-seqs", type=int, default=48)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--min-prompt", type=int, default=8192)
    parser.add_argument("--max-prompt", type=int, default=32768)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--policies", nargs="*", default=POLICIES)
    parser.add_argument("--chunked-prefill", nargs="*", default=None, metavar="POLICY",
                        help="policies (of --policies) also run with prompt chunks beside decode steps; the flag alone: "
                             f"every policy (default: none). Quantized pages are prefilled whole, so e.g. {' '.join(CHUNKED)}")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens per step with --chunked-prefill (default: the engine's, 2048)")
    parser.add_argument("--hf-requests", type=int, default=3, help="requests (the first ones) run through HF generate; 0: none")
    parser.add_argument("--append", action="store_true", help="add the results to an existing --out of the same workload")
    parser.add_argument("--commit", default=None, help="git commit of the code (default: env KVSLIM_COMMIT, else git rev-parse HEAD)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_throughput.json"))
    if parser.parse_args(argv).smoke:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
    if args.chunked_prefill == []:
        args.chunked_prefill = args.policies
    args.chunked_prefill = args.chunked_prefill or []
    return args


def benchmark_model(script: str, spec: str, smoke: bool) -> tuple[Any, bool]:
    """The model a throughput benchmark runs and whether on the GPU: bfloat16 there, float32 on the CPU for
    ``--smoke`` (anything else without a GPU exits naming the script)."""
    cuda = torch.cuda.is_available() and not smoke
    if not cuda and not smoke:
        raise SystemExit(f"{script} needs a CUDA GPU; --smoke runs tiny-llama on the CPU")
    model, _ = load_model(spec, dtype=torch.bfloat16 if cuda else torch.float32, device="cuda" if cuda else "cpu")
    return model, cuda


def report_header(benchmark: str, args: argparse.Namespace, cuda: bool, commit: str, prompts: list[list[int]]
                  ) -> dict[str, Any]:
    """What every throughput report starts with: the benchmark, the random-weight model, the device and software, the
    commit, the pool and the queue's prompts (``--append`` compares these before adding results)."""
    return {
        "benchmark": benchmark,
        "model": f"{args.model} architecture, RANDOM weights, {'bfloat16' if cuda else 'float32'}",
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "kv_memory_gib": args.kv_memory,
        "max_num_seqs": args.max_num_seqs,
        "requests": args.requests,
        "prompt_tokens": [len(p) for p in prompts],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model, cuda = benchmark_model("engine_throughput", args.model, args.smoke)
    prompts = workload(args.requests, args.min_prompt, args.max_prompt, model.config.vocab_size, seed=0)
    bandwidth = copy_bandwidth() if cuda else None
    weights = decode_weight_bytes(model)
    commit = code_commit(args.commit)
    report = {
        **report_header("engine_throughput (saturated)", args, cuda, commit, prompts),
        "output_tokens_per_request": args.output_tokens,
        "eos_ignored": True,
        "decode_weight_bytes": weights,
        "results": [],
    }
    if args.append:
        report = appended_to(args.out, report, ("commit", "model", "kv_memory_gib", "max_num_seqs", "prompt_tokens",
                                                "output_tokens_per_request"))
    if bandwidth is not None:
        print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; decode reads {weights / 1e9:.2f} GB of weights per step",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def record(result: dict[str, Any]) -> None:  # rewritten after each run: a later failure keeps what was measured
        report["results"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "per_request"}), flush=True)
        args.out.write_text(json.dumps(report, indent=2))

    runs = [(p, False) for p in args.policies] + [(p, True) for p in args.policies if p in args.chunked_prefill]
    for policy, chunked in runs:
        if cuda:
            warm_up(model, policy, args, chunked)
        record(run_engine(model, policy, chunked, prompts, args, bandwidth, weights))
    if args.hf_requests and cuda:
        record(run_hf(model, prompts[: args.hf_requests], args))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
