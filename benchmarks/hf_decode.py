"""Decode speed of the Hugging Face path at batch 1, side by side in one run: ms per decoded token.

For each context length, one random prompt is prefilled and then ``--steps`` tokens are decoded greedily by:

* ``DynamicCache``: transformers' default cache (the baseline kvslim's full cache must stay near);
* ``StaticCache``, ``StaticCache+compile``: transformers' preallocated cache, eager and with
  ``torch.compile(mode="reduce-overhead")`` on the decode forward (CUDA graphs);
* ``kvslim:<policy>``: :class:`kvslim.Cache` with full, snapkv(keep=0.25), kivi4 and kivi2 (growing buffers);
* ``kvslim:<policy> static``: the same in static mode (``max_length``: fixed shapes), eager; for full and
  snapkv also compiled, one graph per step, without CUDA graphs (``static+compile``, ``mode="default"``): the
  cache's host-side counts (tokens seen, held) are symbolic ints the compiled step takes as inputs, and CUDA
  graph trees would record a new graph for every new value of those;
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
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache

import kvslim
from kvslim.engine import LLM, SamplingParams
from kvslim.models import load_config
from provenance import code_commit  # noqa: E402  (benchmarks/provenance.py, beside this script)

POLICIES = ("full", "snapkv(keep=0.25)", "kivi4", "kivi2")
#: compiled in static mode too; a quantizer's packing every ``group`` steps changes shapes (a recompile each time)
COMPILED = ("full", "snapkv(keep=0.25)")


def smoke_config() -> LlamaConfig:
    """A 4-layer Llama small enough that a CPU decode step is mostly Python overhead."""
    return LlamaConfig(num_hidden_layers=4, hidden_size=128, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                       intermediate_size=256, vocab_size=512, max_position_embeddings=16384)


def random_model(config: Any, device: str, dtype: torch.dtype) -> Any:
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], Any], steps: int, warmup: int, device: str) -> float:
    """Median milliseconds of ``step`` (launch to synchronized end) over ``steps`` calls after ``warmup`` ones."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def hf_decode(model: Any, prompt: torch.Tensor, cache: Any, steps: int, warmup: int, device: str,
              forward: Callable[..., Any] | None = None) -> float:
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

        return time_steps(step, steps, warmup, device)


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


def compiled(model: Any, mode: str = "reduce-overhead") -> Callable[..., Any]:
    """A fresh ``torch.compile`` of the forward (``reduce-overhead``: CUDA graphs), forgetting earlier caches'
    compilations, so each cache gets its own graphs and never falls back to eager on dynamo's recompile limit."""
    torch._dynamo.reset()
    return torch.compile(model.forward, mode=mode)


def measure(model: Any, context: int, args: argparse.Namespace, device: str, rows: dict[str, float | str],
            save: Callable[[], None]) -> None:
    """Every cache's ms per token at this context into ``rows`` (``save`` after each); a cache that fails records
    its error and the run goes on."""
    gen = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(device)
    room = context + args.steps + args.warmup + 1
    compile_too = device == "cuda" and not args.no_compile

    def record(name: str, run: Callable[[], float]) -> None:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        try:
            rows[name] = run()
            print(f"  context {context:6d}  {name:36s} {rows[name]:8.2f} ms/token", flush=True)
        except Exception as error:  # noqa: BLE001  (one failing cache must not lose the others' numbers)
            rows[name] = f"error: {type(error).__name__}: {str(error)[:300]}"
            print(f"  context {context:6d}  {name:36s} {rows[name]}", flush=True)
        model.config._attn_implementation = "sdpa"  # kvslim.Cache routes it; every cache starts from the original
        save()

    def hf(cache: Callable[[], Any], forward: Callable[[], Any] | None = None) -> Callable[[], float]:
        return lambda: hf_decode(model, prompt, cache(), args.steps, args.warmup, device,
                                 None if forward is None else forward())

    def kvslim_cache(policy: str, max_length: int | None = None) -> Callable[[], Any]:
        return lambda: kvslim.Cache(kvslim.policy(policy), model.config, max_length=max_length)

    record("DynamicCache", hf(lambda: DynamicCache(config=model.config)))
    static = lambda: StaticCache(config=model.config, max_cache_len=room)  # noqa: E731
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
                                                          lambda: compiled(model, "default")))
    record("engine:full", lambda: engine_decode(model, prompt, args.steps, args.warmup, device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a preset whose config is used with random weights")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per cache")
    parser.add_argument("--warmup", type=int, default=8, help="untimed decode steps first (compiles, graph capture)")
    parser.add_argument("--smoke", action="store_true", help="tiny float32 Llama on the CPU, short contexts")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (they compile ~1 min each)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hf_decode.json"))
    args = parser.parse_args()
    if args.smoke:
        device, dtype, config = "cpu", torch.float32, smoke_config()
        if args.contexts == parser.get_default("contexts"):
            args.contexts = [256]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("hf_decode needs a CUDA GPU (or --smoke for a CPU check)")
        device, dtype, config = "cuda", torch.bfloat16, load_config(args.model)
    model = random_model(config, device, dtype)
    commit = code_commit()
    report: dict[str, Any] = {
        "benchmark": "hf_decode", "model": "smoke" if args.smoke else args.model, "weights": "RANDOM",
        "dtype": str(dtype), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "commit": commit, "batch": 1, "steps": args.steps, "warmup": args.warmup,
        "unit": "ms per decoded token (median step)", "results": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for context in args.contexts:
        rows = report["results"][str(context)] = {}
        measure(model, context, args, device, rows, lambda: args.out.write_text(json.dumps(report, indent=1)))
    names = list(next(iter(report["results"].values())))
    print(f"{'cache':36s}" + "".join(f"{c:>10s}" for c in report["results"]))
    for name in names:
        cells = (r.get(name) for r in report["results"].values())
        print(f"{name:36s}" + "".join(f"{c:10.2f}" if isinstance(c, float) else f"{'error':>10s}" for c in cells))


if __name__ == "__main__":
    main()
