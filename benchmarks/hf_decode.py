"""Decode speed of the Hugging Face path at batch 1, side by side in one run: ms per decoded token.

For each context length, one random prompt is prefilled and then ``--steps`` tokens are decoded greedily by:

* ``DynamicCache``: transformers' default cache (the baseline kvslim's full cache must stay near);
* ``StaticCache``, ``StaticCache+compile``: transformers' preallocated cache, eager and with
  ``torch.compile(mode="reduce-overhead")`` on the decode forward (CUDA graphs);
* ``kvslim:<policy>``: :class:`kvslim.Cache` with full, snapkv(keep=0.25), kivi4 and kivi2 (growing buffers);
* ``kvslim:<policy> static``: the same in static mode (``max_length``: fixed shapes), eager; for full and
  snapkv also compiled with ``mode="reduce-overhead"`` (``static+compile``: CUDA graphs, as for ``StaticCache``; a
  compiled step counts on the device, so its graph has no symbolic inputs and is recorded once);
* ``engine:full``: kvslim's own engine (:class:`kvslim.engine.LLM`, paged cache, CUDA graphs) on the same model.

Compiled rows run on a GPU only (skipped by ``--smoke`` and ``--no-compile``); each compiles afresh (~1 min for an
8B model). A row that fails records its error instead of a number and the run goes on; the JSON is rewritten
after every row, so a run cut short keeps what it measured.

Every decode step is timed from launch to a synchronized end (the greedy token is read back, as generation
does); the reported number is the median over the steps after ``--warmup`` untimed ones. Weights are RANDOM
(seeded): timing only. The GPU run (random-weight Llama-3.1-8B, bf16), one context per command so each stays
within ~6 minutes on an H200:

    python benchmarks/hf_decode.py --contexts 8192 --out benchmarks/results/hf_decode_h200_8k.json
    python benchmarks/hf_decode.py --contexts 32768 --out benchmarks/results/hf_decode_h200_32k.json

``--smoke`` runs a tiny float32 Llama on the CPU with short contexts (what the test runs).

``--cpu-overhead`` measures what decides these numbers at batch 1 without a GPU: the host work per step. An 8-layer
float32 Llama of hidden size 256 on the CPU (run with ``OMP_NUM_THREADS=1``) makes the math small, so ms per token is
mostly Python and op dispatch. Every run records, for one decoding step of each eager HF-path row, the aten ops
dispatched, the host syncs among them and the Python function calls made (``ops_per_step`` in the JSON: what a
launch-bound GPU step pays for), and on a GPU the step's costliest kernels; ``attention_us`` times one layer's decode
attention alone for each SDPA call the HF path can make (see :func:`attention_calls`):

    OMP_NUM_THREADS=1 python benchmarks/hf_decode.py --cpu-overhead --out benchmarks/results/hf_decode_cpu_overhead.json
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import math
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from provenance import code_commit
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache

import kvslim
from kvslim.engine import LLM, SamplingParams
from kvslim.models import load_config

POLICIES = ("full", "snapkv(keep=0.25)", "kivi4", "kivi2")
#: compiled in static mode too; a quantizer's packing every ``group`` steps changes shapes (a recompile each time)
COMPILED = ("full", "snapkv(keep=0.25)")


def smoke_config() -> LlamaConfig:
    """A 4-layer Llama small enough that a CPU decode step is mostly Python overhead."""
    return LlamaConfig(num_hidden_layers=4, hidden_size=128, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                       intermediate_size=256, vocab_size=512, max_position_embeddings=16384)


def overhead_config() -> LlamaConfig:
    """An 8-layer Llama whose CPU decode step is small in math, so its time is the host work per layer."""
    return LlamaConfig(num_hidden_layers=8, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                       head_dim=32, intermediate_size=512, vocab_size=1024, max_position_embeddings=16384)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (each is at least one kernel launch on a GPU) and among them the
    reads of a tensor's value on the host (``.item()``, ``bool()``, ``int()``: a GPU sync each)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops += 1
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def step_counts(step: Callable[[], Any], device: str) -> dict[str, Any]:
    """Aten ops, host syncs and Python function calls of one ``step`` (separate calls: the counters disturb each
    other); on a GPU also the device time of the step's costliest kernels (``top_kernels_us``), which says where a
    step that is not launch-bound spends its time (which attention kernel SDPA picked, for one)."""
    with OpCounter() as counter:
        step()
    profile = cProfile.Profile()
    profile.runcall(step)
    counts: dict[str, Any] = {"aten_ops": counter.ops, "host_syncs": counter.syncs,
                              "python_calls": pstats.Stats(profile).total_calls}  # type: ignore[attr-defined]
    if device == "cuda":
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step()
                sync(device)
            kernels = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]
            counts["top_kernels_us"] = {e.key[:120]: round(e.device_time_total, 1) for e in kernels}
        except Exception as error:  # noqa: BLE001  (a profiler that cannot run must not lose the row's timing)
            counts["top_kernels_us"] = f"error: {type(error).__name__}: {str(error)[:200]}"
    return counts


def random_model(config: Any, device: str, dtype: torch.dtype) -> Any:
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


#: the clock steps are timed with: wall time, except in ``--cpu-overhead`` runs, which time the process's CPU time so
#: that other processes sharing the cores do not count (the CPU step is all host work anyway)
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def time_steps(step: Callable[[], Any], steps: int, warmup: int, device: str,
               counts: dict[str, Any] | None = None) -> float:
    """Median milliseconds of ``step`` (launch to synchronized end) over ``steps`` calls after ``warmup`` ones;
    ``counts``, when given, receives the counts of untimed steps after the timed ones (see :func:`step_counts`)."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        start = CLOCK[0]()
        step()
        sync(device)
        times.append(CLOCK[0]() - start)
    if counts is not None:
        counts.update(step_counts(step, device))
    return 1e3 * statistics.median(times)


def hf_decode(model: Any, prompt: torch.Tensor, cache: Any, steps: int, warmup: int, device: str,
              forward: Callable[..., Any] | None = None, counts: dict[str, Any] | None = None) -> float:
    """Prefill ``prompt`` into ``cache``, then time greedy decode steps of ``forward`` (the model's by default)."""
    forward = forward or model
    position = prompt.shape[1]
    with torch.no_grad():
        token = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

        def step() -> None:
            nonlocal token, position
            where = torch.tensor([position], device=prompt.device)
            logits = forward(token, past_key_values=cache, use_cache=True, cache_position=where,
                             position_ids=where[None]).logits
            token = logits[:, -1:].argmax(-1)
            int(token)  # generation reads every token back: part of the step
            position += 1

        return time_steps(step, steps, warmup, device, counts)


def engine_decode(model: Any, prompt: torch.Tensor, steps: int, warmup: int, device: str) -> float:
    """kvslim's engine on the same model at batch 1: one request, its prefill done, then timed ``step()`` calls."""
    tokens = prompt.shape[1] + steps + warmup + 8
    per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
        (model.config.head_dim or model.config.hidden_size // model.config.num_attention_heads) * model.dtype.itemsize
    llm = LLM(model, policy="full", kv_memory=2 * tokens * per_token / 2**30, max_num_seqs=1)
    llm.add_request(prompt[0].tolist(), SamplingParams(max_tokens=steps + warmup + 4, ignore_eos=True))
    while llm.scheduler.waiting:
        llm.step()
    return time_steps(llm.step, steps, warmup, device)


def attention_calls(config: Any, context: int, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Microseconds (median, synchronized) of one layer's decode attention over ``context`` cached tokens, for the SDPA
    calls the HF path can make: transformers' ``enable_gqa`` (DynamicCache), each KV head with its query group as
    rows (``grouped_rows``), and the same under a per-head mask (``grouped_rows_masked``, static mode and ragged
    heads). Keys are views of a larger buffer, as a growing tail hands them out; which call is fastest decides
    :func:`kvslim.cache.attention.masked_attention`'s choice per device."""
    heads, q_heads = config.num_key_value_heads, config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    room = context + context // 8 + 64
    keys, values = (torch.randn(1, heads, room, dim, device=device, dtype=dtype)[:, :, :context] for _ in range(2))
    query = torch.randn(1, q_heads, 1, dim, device=device, dtype=dtype)
    rows = query.reshape(1, heads, q_heads // heads, dim)
    mask = torch.ones(1, heads, 1, context, dtype=torch.bool, device=device)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = {"enable_gqa": lambda: sdpa(query, keys, values, enable_gqa=True),
             "grouped_rows": lambda: sdpa(rows, keys, values),
             "grouped_rows_masked": lambda: sdpa(rows, keys, values, attn_mask=mask)}
    return {name: round(1e3 * time_steps(call, 50, 5, device), 1) for name, call in calls.items()}


def compiled(model: Any) -> Callable[..., Any]:
    """A fresh ``torch.compile`` of the forward (``reduce-overhead``: CUDA graphs), forgetting earlier caches'
    compilations, so each cache gets its own graphs and never falls back to eager on dynamo's recompile limit."""
    torch._dynamo.reset()
    return torch.compile(model.forward, mode="reduce-overhead")


def measure(model: Any, context: int, args: argparse.Namespace, device: str, rows: dict[str, float | str],
            save: Callable[[], None], ops: dict[str, dict[str, Any]]) -> None:
    """Every cache's ms per token at this context into ``rows`` (``save`` after each); a cache that fails records
    its error and the run goes on. ``ops`` receives each eager HF-path row's counts per step (:func:`step_counts`)."""
    gen = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(device)
    room = context + args.steps + args.warmup + 3  # the prefill's token, and 2 counted steps (--cpu-overhead)
    compile_too = device == "cuda" and not args.no_compile

    counts: dict[str, Any] = {}

    def record(name: str, run: Callable[[], float]) -> None:
        counts.clear()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        try:
            rows[name] = run()
            if counts:
                ops[name] = dict(counts)
            tally = f"  {counts['aten_ops']:5d} ops {counts['host_syncs']:3d} syncs {counts['python_calls']:6d} calls" \
                if counts else ""
            print(f"  context {context:6d}  {name:36s} {rows[name]:8.2f} ms/token{tally}", flush=True)
        except Exception as error:  # noqa: BLE001  (one failing cache must not lose the others' numbers)
            rows[name] = f"error: {type(error).__name__}: {str(error)[:300]}"
            print(f"  context {context:6d}  {name:36s} {rows[name]}", flush=True)
        model.config._attn_implementation = "sdpa"  # kvslim.Cache routes it; every cache starts from the original
        save()

    def hf(cache: Callable[[], Any], forward: Callable[[], Any] | None = None) -> Callable[[], float]:
        return lambda: hf_decode(model, prompt, cache(), args.steps, args.warmup, device,
                                 None if forward is None else forward(), counts if forward is None else None)

    def kvslim_cache(policy: str, max_length: int | None = None) -> Callable[[], Any]:
        return lambda: kvslim.Cache(kvslim.policy(policy), model.config, max_length=max_length)

    record("DynamicCache", hf(lambda: DynamicCache(config=model.config)))
    static = lambda: StaticCache(config=model.config, max_cache_len=room)
    record("StaticCache", hf(static))
    if compile_too:
        record("StaticCache+compile", hf(static, lambda: compiled(model)))
    for policy in POLICIES:
        record(f"kvslim:{policy}", hf(kvslim_cache(policy)))
    held = {"snapkv(keep=0.25)": math.ceil(context / 4) + room - context}  # max_length: what decoding holds
    for policy in POLICIES:
        record(f"kvslim:{policy} static", hf(kvslim_cache(policy, held.get(policy, room))))
    if compile_too:
        for policy in COMPILED:
            record(f"kvslim:{policy} static+compile", hf(kvslim_cache(policy, held.get(policy, room)),
                                                          lambda: compiled(model)))
    if not args.cpu_overhead:  # the engine's step is measured on the GPU (its CPU path is not what it serves)
        record("engine:full", lambda: engine_decode(model, prompt, args.steps, args.warmup, device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a preset whose config is used with random weights")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per cache")
    parser.add_argument("--warmup", type=int, default=8, help="untimed decode steps first (compiles, graph capture)")
    parser.add_argument("--smoke", action="store_true", help="tiny float32 Llama on the CPU, short contexts")
    parser.add_argument("--cpu-overhead", action="store_true",
                        help="8-layer float32 Llama on the CPU: host time and op/call counts per step (default 2048)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (they compile ~1 min each)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hf_decode.json"))
    args = parser.parse_args()
    if args.smoke or args.cpu_overhead:
        device, dtype = "cpu", torch.float32
        config = overhead_config() if args.cpu_overhead else smoke_config()
        if args.cpu_overhead:
            CLOCK[0] = time.process_time
        if args.contexts == parser.get_default("contexts"):
            args.contexts = [2048] if args.cpu_overhead else [256]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("hf_decode needs a CUDA GPU (or --smoke for a CPU check)")
        device, dtype, config = "cuda", torch.bfloat16, load_config(args.model)
    model = random_model(config, device, dtype)
    commit = code_commit()
    report: dict[str, Any] = {
        "benchmark": "hf_decode",
        "model": "cpu-overhead" if args.cpu_overhead else "smoke" if args.smoke else args.model, "weights": "RANDOM",
        "dtype": str(dtype), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "commit": commit, "batch": 1, "steps": args.steps, "warmup": args.warmup,
        "unit": "ms per decoded token (median step)" + (", process CPU time" if args.cpu_overhead else ""), "results": {}, "ops_per_step": {},
        "attention_us": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for context in args.contexts:
        rows = report["results"][str(context)] = {}
        report["attention_us"][str(context)] = attention_calls(config, context, device, dtype)
        print(f"  context {context:6d}  one layer's decode attention (us): {report['attention_us'][str(context)]}")
        ops = report["ops_per_step"][str(context)] = {}
        measure(model, context, args, device, rows, lambda: args.out.write_text(json.dumps(report, indent=1)), ops)
    names = list(next(iter(report["results"].values())))
    print(f"{'cache':36s}" + "".join(f"{c:>10s}" for c in report["results"]))
    for name in names:
        cells = (r.get(name) for r in report["results"].values())
        print(f"{name:36s}" + "".join(f"{c:10.2f}" if isinstance(c, float) else f"{'error':>10s}" for c in cells))


if __name__ == "__main__":
    main()
