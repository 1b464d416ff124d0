"""Where one engine decode step's time goes, set against its roofline (issue 14).

A **random-weight** Llama-3.1-8B-shaped model in bf16 (no download; speed only). For each batch and
context, ``batch`` sequences that already hold ``context`` tokens are placed in the pool directly (their
pages hold random keys/values: prefilling 16 x 32k tokens would take a minute per point and measures
nothing here), then:

* ``step_ms``: ``LLMEngine.step()`` wall time (schedule, host inputs, graph replay, logits, sampling; it
  ends synchronized because sampling reads the tokens), median of ``--iters``;
* ``forward_ms``: the captured decode graph's replay alone (CUDA events), i.e. the GPU's share;
* ``host_ms``: ``step_ms - forward_ms - logits_ms``: what the GPU waits for between replays;
* per component, from a profiler trace of one eager forward (same kernels as the graph): paged attention,
  GEMMs, everything else (norms, RoPE, KV writes, residual adds), each against its own byte floor;
* ``roofline_ms``: (weights read once + every sequence's KV blocks) / the copy bandwidth measured here.

    python benchmarks/decode_profile.py --batch 4 16 32 --context 8192 32768 --out benchmarks/results/decode_profile_h200.json
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from engine_throughput import decode_weight_bytes, kv_bytes_read
from provenance import code_commit
from timing import copy_bandwidth
from torch.profiler import ProfilerActivity, profile

from kvslim.engine import LLMEngine, SamplingParams
from kvslim.engine.sequence import Sequence, Status
from kvslim.models import load_model

ATTENTION = ("paged", "combine")
GEMM = ("gemm", "gemv", "nvjet", "cutlass", "sm90", "cublas", "splitk", "matmul")




def token_bytes(model: Any) -> int:
    """Model-dtype KV bytes of one token (every layer, keys and values)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * c.num_key_value_heads * head_dim * 2 * model.dtype.itemsize


def place(engine: LLMEngine, batch: int, context: int) -> list[Sequence]:
    """``batch`` running sequences of ``context`` tokens whose keys/values are already in pages."""
    runner = engine.runner
    seqs = []
    for b in range(batch):
        seq = Sequence([1 + (b + i) % 1000 for i in range(context)], SamplingParams(max_tokens=1 << 20, ignore_eos=True),
                       request_id=f"placed-{b}")
        engine.blocks.allocate(seq, context)
        seq.set_held(torch.full((runner.num_layers, runner.num_kv_heads), context, dtype=torch.long))
        if runner.kv.ring:
            seq.tail = torch.zeros(runner.num_layers, runner.num_kv_heads, dtype=torch.long)
        seq.status = Status.RUNNING
        seq.first_token_time = time.perf_counter()
        engine.scheduler.running.append(seq)
        engine.requests[seq.request_id] = [seq]
        seqs.append(seq)
    return seqs


def fill_pages(engine: LLMEngine) -> None:
    """Random keys/values (pages of zeros would make every softmax uniform: same speed, but say so)."""
    kv = engine.runner.kv
    for name in ("k_cache", "v_cache"):
        pages = getattr(kv, name, None)
        if isinstance(pages, torch.Tensor) and pages.is_floating_point():
            pages.normal_(0, 1)


def timed(fn: Any, iters: int) -> float:
    """Median milliseconds of ``fn`` on the device (CUDA events)."""
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def components(engine: LLMEngine, seqs: list[Sequence]) -> dict[str, float]:
    """Kernel milliseconds per category over one eager decode forward (profiler trace)."""
    runner = engine.runner
    batch = runner.prepare_decode(seqs)
    runner.forward_decode(batch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.forward_decode(batch)
        torch.cuda.synchronize()
    out = {"attention_ms": 0.0, "gemm_ms": 0.0, "other_ms": 0.0, "kernels": 0}
    top: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms, name = event.device_time / 1e3, event.name.lower()
        kind = "attention_ms" if any(k in name for k in ATTENTION) else "gemm_ms" if any(k in name for k in GEMM) else "other_ms"
        out[kind] += ms
        out["kernels"] += 1
        top[event.name[:80]] = top.get(event.name[:80], 0.0) + ms
    out["top_kernels_ms"] = dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])
    return out




def measure(model: Any, policy: str, batch: int, context: int, args: argparse.Namespace, bandwidth: float,
            weights: int) -> dict[str, Any]:
    need_gib = batch * (context + args.iters * 3 + 64) * token_bytes(model) / 2**30 * 1.05 + 0.5
    engine = LLMEngine(model, policy=policy, kv_memory=need_gib, max_num_seqs=batch, block_size=args.block_size)
    fill_pages(engine)
    seqs = place(engine, batch, context)
    for _ in range(3):  # capture the graph, compile kernels
        engine.step()
    torch.cuda.synchronize()
    steps = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        engine.step()
        steps.append((time.perf_counter() - t0) * 1e3)
    runner = engine.runner
    profiler = cProfile.Profile()  # where the host's share of a step goes (Python functions, own time)
    profiler.runcall(lambda: [engine.step() for _ in range(10)])
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    host_top = sorted(((f"{fn[0].split('/')[-1]}:{fn[2]}", tt / 10 * 1e3) for fn, (_, _, tt, _, _) in stats.items()),
                      key=lambda kv: -kv[1])[:15]
    result: dict[str, Any] = {"policy": engine.policy.spec, "batch": batch, "context": context,
                              "block_size": engine.blocks.block_size, "step_ms": statistics.median(steps),
                              "step_ms_p90": sorted(steps)[int(0.9 * len(steps))],
                              "host_top_ms_per_step": dict(host_top)}
    graphs = runner.graphs
    prepared = runner.prepare_decode(seqs)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        runner.prepare_decode(seqs)
    result["prepare_decode_ms"] = (time.perf_counter() - t0) * 1e3 / args.iters
    if graphs is not None and graphs.graphs:
        size = next(iter(graphs.graphs))
        graphs._load(prepared, len(seqs))
        result["forward_ms"] = timed(graphs.graphs[size].replay, args.iters)
    normed = torch.randn(batch, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    result["logits_ms"] = timed(lambda: runner._logits(normed), args.iters)
    if "forward_ms" in result:
        result["host_ms"] = result["step_ms"] - result["forward_ms"] - result["logits_ms"]
    comp = components(engine, seqs)
    kv = kv_bytes_read(engine, seqs)
    lm_head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    result.update(comp)
    result.update({
        "kv_bytes": kv, "weight_bytes": weights,
        "roofline_ms": (weights + kv) / bandwidth * 1e3,
        "attention_floor_ms": kv / bandwidth * 1e3,
        "gemm_floor_ms": (weights - lm_head) / bandwidth * 1e3,
    })
    result["roofline_fraction_step"] = result["roofline_ms"] / result["step_ms"]
    if "forward_ms" in result:
        result["roofline_fraction_forward"] = (result["roofline_ms"] - lm_head / bandwidth * 1e3) / result["forward_ms"]
    result["attention_fraction_of_floor"] = result["attention_floor_ms"] / max(comp["attention_ms"], 1e-9)
    result["gemm_fraction_of_floor"] = result["gemm_floor_ms"] / max(comp["gemm_ms"], 1e-9)
    del engine, seqs, prepared, runner, graphs
    gc.collect()  # the engine, its graphs and sequences point at each other: free the pool before the next point
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--policies", nargs="*", default=["full", "kivi4"])
    parser.add_argument("--batch", type=int, nargs="*", default=[4, 16, 32])
    parser.add_argument("--context", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--max-kv-gib", type=float, default=90.0, help="skip points whose full cache exceeds this")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_profile.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_profile needs a CUDA GPU")
    model, _ = load_model(args.model, dtype=torch.bfloat16, device="cuda")
    bandwidth = copy_bandwidth()
    weights = decode_weight_bytes(model)
    commit = code_commit(args.commit)
    report: dict[str, Any] = {"benchmark": "decode_profile", "model": f"{args.model} architecture, RANDOM weights, bf16",
                              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit,
                              "copy_bandwidth_bytes_per_s": bandwidth, "results": []}
    for policy in args.policies:
        for context in args.context:
            for batch in args.batch:
                if batch * context * token_bytes(model) / 2**30 > args.max_kv_gib:
                    continue
                try:
                    row = measure(model, policy, batch, context, args, bandwidth, weights)
                except Exception as err:  # one point failing must not lose the others
                    row = {"policy": policy, "batch": batch, "context": context, "error": f"{type(err).__name__}: {err}"}
                    gc.collect()
                    torch.cuda.empty_cache()
                report["results"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("top_kernels_ms", "host_top_ms_per_step")}),
                      flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
