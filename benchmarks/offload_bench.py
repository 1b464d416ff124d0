"""Offloading at long context on one GPU: decode latency, device memory and host→device copies, full vs KCache vs PQCache.

Builds a **random-weight** Llama-3.1-8B-shaped model in bf16 on the GPU (speed and memory only, not quality),
runs one prompt of ``--context`` tokens (32k by default) and times every decode step:

* **engine** (paged): ``full``, KCache (keys in device pages, values in pinned host pages;
  :mod:`kvslim.engine.offload_kv`) and PQCache (key codes in device pages, exact keys and values in pinned
  host pages; :mod:`kvslim.engine.pq_kv`), each offloading method twice: rows fetched by the zero-copy
  kernel (:mod:`kvslim.kernels.host_gather`) and by the staged path (``copy_rows``: row numbers back to the
  host, CPU gather, one copy). Each pool is sized to the request.
* **Hugging Face path** (``kvslim.Cache``): ``full``, KCache and PQCache, rows fetched as ``fetch_rows`` chooses.

Per run: prefill time, median and mean decode step, KV device bytes and host bytes as the cache accounts them,
device memory held after the prefill and the decode steps' peak (both minus the weights), and the bytes copied
host→device per step. The copy rates are measured apart: a pinned 1 GiB host→device copy, and both ways of
fetching the rows one layer reads per step at this context (KCache: N values; PQCache: k keys and values).

    python benchmarks/offload_bench.py --out $OUT/offload_h100.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import kvslim
from kvslim.cache import offload
from kvslim.engine import LLMEngine, SamplingParams
from kvslim.engine.compression import Compression
from kvslim.engine.kv_store import make_store
from kvslim.hf_compat import cache_arg
from kvslim.kernels import host_gather
from kvslim.models import load_model


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after two warm-ups, by CUDA events."""
    times = []
    for i in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_rates(rows: int, widths: dict[str, int], pool_rows: int) -> dict[str, Any]:
    """Bytes/s of a pinned 1 GiB host→device copy, and of fetching ``rows`` random rows of a pinned pool of each
    row width (bf16 elements), zero-copy and staged."""
    host = torch.randint(0, 255, (2**30,), dtype=torch.uint8).pin_memory()
    device = torch.empty_like(host, device="cuda")
    rates: dict[str, Any] = {"pinned_h2d_bytes_per_s": 2**30 / timed(lambda: device.copy_(host, non_blocking=True), 10),
                             "zero_copy_available": host_gather.zero_copy_works(torch.device("cuda"))}
    del host, device
    cuda = torch.device("cuda")
    for name, width in widths.items():
        pool = torch.randn(pool_rows, width, dtype=torch.bfloat16).pin_memory()
        index = torch.randint(0, pool_rows, (rows,), device="cuda")  # chosen on the device, as a decode step does
        moved = rows * width * 2
        for path, fetch in (("zero_copy", offload.fetch_rows), ("staged", offload.copy_rows)):
            seconds = timed(lambda: fetch(pool, index, cuda), 20)
            rates[f"{name}_{path}"] = {"rows": rows, "bytes": moved, "s": seconds, "bytes_per_s": moved / seconds}
        del pool
    return rates


class staged:
    """Within this block every offloading path fetches rows through the host (``copy_rows``), not zero-copy."""

    def __enter__(self) -> None:
        self.saved = offload._zero_copy
        offload._zero_copy = lambda host, device: False

    def __exit__(self, *exc: object) -> None:
        offload._zero_copy = self.saved


def engine_pool_gib(model: Any, policy: str, tokens: int, block_size: int = 16) -> float:
    """KV memory that holds exactly one request of ``tokens`` tokens (blocks, one spare, and one ring row)."""
    config = model.config
    compression = Compression(kvslim.policy(policy), config.num_hidden_layers, 1.0)
    store = make_store(compression.storage, config.num_hidden_layers, config.num_key_value_heads,
                       config.hidden_size // config.num_attention_heads, model.dtype, model.device)
    blocks = -(-tokens // block_size) + 1
    need = blocks * store.block_bytes(block_size) + store.row_bytes
    return max(need, store.row_bytes / store.ring_share * 1.001) / 2**30  # the rows may take at most that share


def run_engine(model: Any, policy: str, prompt: list[int], steps: int, weights: int) -> dict[str, Any]:
    engine = LLMEngine(model, policy=policy, kv_memory=engine_pool_gib(model, policy, len(prompt) + steps + 1),
                       max_num_seqs=1)
    kv = engine.runner.kv
    torch.cuda.synchronize()
    rid = engine.add_request(prompt, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    t0 = time.perf_counter()
    engine.step()  # the prefill (the first token comes with it)
    prefill = time.perf_counter() - t0
    held = torch.cuda.memory_allocated() - weights
    torch.cuda.reset_peak_memory_stats()
    moved = getattr(kv, "h2d_bytes", 0)
    times = []
    while engine.has_unfinished:
        t0 = time.perf_counter()
        engine.step()  # sampling reads the token back: the step has finished on the device
        times.append(time.perf_counter() - t0)
    stats = engine.finished.pop(rid).stats
    result = {
        "path": "engine", "policy": engine.policy.spec, "context": len(prompt), "decode_steps": len(times),
        "prefill_s": prefill, "decode_ms_median": statistics.median(times) * 1e3,
        "decode_ms_mean": statistics.mean(times) * 1e3,
        "kv_device_bytes": stats["peak_kv_bytes"], "kv_host_bytes": stats["peak_kv_host_bytes"],
        "kv_full_bytes": stats["full_kv_bytes"],
        "kv_pool_device_bytes": engine.blocks.num_blocks * engine.block_bytes + engine.blocks.rows * kv.row_bytes,
        "kv_pool_host_bytes": engine.blocks.num_blocks * engine.host_block_bytes,
        "device_after_prefill_minus_weights_bytes": held,
        "device_peak_minus_weights_bytes": torch.cuda.max_memory_allocated() - weights,
        "h2d_bytes_per_step": (getattr(kv, "h2d_bytes", 0) - moved) / len(times),
    }
    del engine, kv
    torch.cuda.empty_cache()
    return result


@torch.inference_mode()
def run_hf(model: Any, policy: str, prompt: list[int], steps: int, weights: int) -> dict[str, Any]:
    cache = kvslim.Cache(kvslim.policy(policy), model.config)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.tensor([prompt], device=model.device)
    t0 = time.perf_counter()
    token = model(ids, **cache_arg(cache), use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t0
    held = torch.cuda.memory_allocated() - weights
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        token = model(token, **cache_arg(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    stats = cache.stats()
    result = {
        "path": "hf", "policy": stats["policy"], "context": len(prompt), "decode_steps": steps, "prefill_s": prefill,
        "decode_ms_median": statistics.median(times) * 1e3, "decode_ms_mean": statistics.mean(times) * 1e3,
        "kv_device_bytes": stats["device_nbytes"], "kv_host_bytes": stats["host_nbytes"],
        "kv_full_bytes": stats["full_nbytes"],
        "device_after_prefill_minus_weights_bytes": held,
        "device_peak_minus_weights_bytes": torch.cuda.max_memory_allocated() - weights,
    }
    del cache
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed per run")
    parser.add_argument("--kcache", default="kcache(fraction=0.1)")
    parser.add_argument("--pqcache", default="pqcache(fraction=0.1)")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/offload_h100.json"))
    args = parser.parse_args()
    model, _ = load_model(args.model, dtype=torch.bfloat16, device="cuda")
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = config.hidden_size // config.num_attention_heads
    rng = random.Random(0)
    prompt = [rng.randrange(1, config.vocab_size) for _ in range(args.context)]
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    fetched_rows = -(-args.context // 10) * config.num_key_value_heads  # one layer's top 10% at full context
    widths = {"kcache_values": head_dim, "pqcache_keys_values": 2 * head_dim}
    report: dict[str, Any] = {
        "benchmark": "offload_bench", "commit": commit,
        "model": f"{args.model} architecture ({config.num_hidden_layers} layers), RANDOM weights, bfloat16",
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "context": args.context,
        "copy": copy_rates(fetched_rows, widths, (args.context + 64) * config.num_key_value_heads),
        "runs": [],
    }
    runs = [("engine", "full", False), ("engine", args.kcache, False), ("engine", args.kcache, True),
            ("engine", args.pqcache, False), ("engine", args.pqcache, True),
            ("hf", "full", False), ("hf", args.kcache, False), ("hf", args.pqcache, False)]
    short = prompt[:512]
    for path, policy, through_host in runs:
        run = run_engine if path == "engine" else run_hf
        with staged() if through_host else contextlib.nullcontext():
            run(model, policy, short, 4, weights)  # warm-up: kernels compiled, allocator primed
            result = run(model, policy, prompt, args.steps, weights)
        zero_copy = report["copy"]["zero_copy_available"] and not through_host
        result["fetch"] = "none" if policy == "full" else "zero_copy" if zero_copy else "staged"
        report["runs"].append(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"{path:6} {result['fetch']:9} {result['policy'][:44]:44} prefill {result['prefill_s']:6.2f}s "
              f"decode {result['decode_ms_median']:7.1f} ms"
              f" device KV {result['kv_device_bytes'] / 2**30:6.3f} GiB host KV {result['kv_host_bytes'] / 2**30:5.2f} GiB"
              f" peak-weights {result['device_peak_minus_weights_bytes'] / 2**30:5.2f} GiB", flush=True)
    copy = report["copy"]
    print(f"pinned H2D {copy['pinned_h2d_bytes_per_s'] / 1e9:.1f} GB/s; zero copy available: {copy['zero_copy_available']}")
    for name in widths:
        for path in ("zero_copy", "staged"):
            c = copy[f"{name}_{path}"]
            print(f"  {name} {path}: {c['bytes'] / 2**20:.1f} MiB in {c['s'] * 1e3:.2f} ms "
                  f"= {c['bytes_per_s'] / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
