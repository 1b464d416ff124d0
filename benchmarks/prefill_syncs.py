"""Host syncs of one compressed prefill, per layer, per policy: what makes the host wait for the GPU.

Why: prefilling long prompts one at a time with an evictor is host-bound on a GPU (the GPU work of a 4k-token
prompt of a 0.5B model is ~10-15 ms; the host took ~114 ms with snapkv). Each device->host read (``bool(t)``,
``.item()``, ``int(t)``, boolean-mask indexing, ``torch.nonzero``, sizes read back from the data) blocks the host
until the GPU catches up, once per layer per prompt. Those reads show up as the same aten ops on the CPU, so this
counts them without a GPU; on a GPU the same script also gives the time a prompt takes.

For each policy it prefills one prompt (after a warm-up prompt) through the paged engine (``LLMEngine``, prefill
only: one step, ``max_tokens=1``) and through ``kvslim.Cache`` (one Hugging Face forward), under
``torch.profiler``, and prints per layer per prompt: syncs (``aten::_local_scalar_dense``, ``aten::nonzero``,
``aten::masked_select``: every op whose result the host must read or whose output size depends on the data, and
``Tensor.tolist``/``Tensor.cpu`` calls, which are no aten op),
all aten ops, and the wall time per prompt (without the profiler, median of ``--iters``). The ``full`` rows are the
per-prompt floor spread over the layers (the engine copies the held counts to the host once and samples the token);
on a CPU run every scalar read counts, also of tensors that are on the host anyway (the engine's held counts after
that copy); on a GPU run ``tolist``/``cpu`` count only for device tensors.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/prefill_syncs.py                      # tiny-llama, CPU
    PYTHONPATH=src python benchmarks/prefill_syncs.py --model Qwen/Qwen2.5-0.5B-Instruct --dtype bfloat16 --device cuda \\
        --tokens 4096 --iters 5 \\
        --out benchmarks/results/prefill_syncs_h200.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

import kvslim
from kvslim.engine import LLMEngine, SamplingParams
from kvslim.hf_compat import cache_arg
from kvslim.methods.kvzip import reconstruct
from kvslim.models import load_model

#: ops that make the host wait: a value read back, or an output whose size depends on the data
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")
#: reads back to the host that are no aten op (counted by wrapping them)
READS = ("tolist", "cpu")
POLICIES = ["full", "snapkv(keep=0.25)", "adakv(keep=0.25)", "expected_attention(keep=0.25)", "keydiff(keep=0.25)",
            "streaming(keep=0.25,sinks=4)", "pyramidkv(keep=0.25)", "kvzip(keep=0.25)"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_prefill(model: Any, policy: str, prompt: list[int], device: torch.device) -> Callable[[], None]:
    """A callable prefilling ``prompt`` once through a fresh request of one engine (pool built once)."""
    engine = LLMEngine(model, policy=policy, kv_memory=0.05 if device.type == "cpu" else 0.3, device=device,
                       enforce_eager=True)

    def run() -> None:
        engine.reset_prefix_cache()  # else every prefill after the first reads the prompt back from the pool
        engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        while engine.has_unfinished:
            engine.step()
        engine.finished.clear()
    return run


def cache_prefill(model: Any, policy: str, prompt: list[int], device: torch.device) -> Callable[[], None]:
    """A callable prefilling ``prompt`` once through a fresh ``kvslim.Cache`` (KVzip's probing pass included)."""
    method = kvslim.policy(policy)
    ids = torch.tensor([prompt], device=device)

    def run() -> None:
        cache = kvslim.Cache(method, model.config)
        model(ids, use_cache=True, **cache_arg(cache))
        if method.probes:
            reconstruct(model, cache, ids)
    return run


@contextmanager
def counting_reads(device: torch.device) -> Iterator[Counter]:
    """Count ``Tensor.tolist()`` and ``Tensor.cpu()`` calls on ``device``'s tensors (every tensor on a CPU run): the
    profiler does not see them as ops, yet on a GPU each waits for the device."""
    reads: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name: str) -> Callable[..., Any]:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if device.type == "cpu" or tensor.device.type != "cpu":
                reads[name] += 1
            return originals[name](tensor, *args, **kwargs)
        return read
    for name in READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def measure(run: Callable[[], None], layers: int, device: torch.device, iters: int) -> dict[str, float]:
    """Syncs and aten ops per layer of one call of ``run`` (profiled), and its median wall ms (not profiled)."""
    run()  # warm-up: allocations, kernels' first launch
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof, counting_reads(device) as reads:
        run()
        synchronize(device)
    counts = Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    averages = prof.key_averages()
    gpu = sorted(((e.self_device_time_total / 1e3, e.key) for e in averages if e.self_device_time_total > 0), reverse=True)
    counts.update({f"Tensor.{name}": n for name, n in reads.items()})
    times = []
    for _ in range(iters):
        synchronize(device)
        begin = time.perf_counter()
        run()
        synchronize(device)
        times.append((time.perf_counter() - begin) * 1e3)
    syncs = SYNC_OPS + tuple(f"Tensor.{name}" for name in READS)
    return {"syncs_per_layer": sum(counts[op] for op in syncs) / layers,
            **{f"{op.split('::')[-1].split('.')[-1]}_per_layer": counts[op] / layers for op in syncs},
            "aten_ops_per_layer": sum(n for op, n in counts.items() if op.startswith("aten::")) / layers,
            "ms_per_prompt": statistics.median(times),
            # GPU busy time of the profiled prompt (kernels, summed) and its five largest ops: wall ms far above it
            # means the host, not the GPU, sets the pace
            "gpu_ms_per_prompt": sum(ms for ms, _ in gpu), "top_gpu_ops": [[name, round(ms, 3)] for ms, name in gpu[:5]]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="anything kvslim.load_model accepts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the model's own")
    parser.add_argument("--tokens", type=int, default=512, help="prompt length")
    parser.add_argument("--iters", type=int, default=3, help="timed prefills per policy (median)")
    parser.add_argument("--policies", nargs="+", default=POLICIES)
    parser.add_argument("--paths", nargs="+", default=["engine", "cache"], choices=["engine", "cache"])
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    return parser.parse_args(argv)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    model, _ = load_model(args.model, getattr(torch, args.dtype) if args.dtype else None, device=device)
    layers = model.config.num_hidden_layers
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, min(vocab, 30000), (args.tokens,), generator=generator).tolist()
    builders = {"engine": engine_prefill, "cache": cache_prefill}
    rows = []
    print(f"{args.model} on {device}, {args.tokens}-token prompt, {layers} layers; per layer per prompt:")
    print(f"{'path':7s} {'policy':32s} {'syncs':>6s} {'scalar':>6s} {'nonzero':>7s} {'tolist':>6s} {'cpu':>5s} "
          f"{'aten ops':>9s} {'ms/prompt':>10s} {'gpu ms':>7s}")
    for path in args.paths:
        for policy in args.policies:
            row = {"path": path, "policy": policy,
                   **measure(builders[path](model, policy, prompt, device), layers, device, args.iters)}
            rows.append(row)
            print(f"{path:7s} {policy:32s} {row['syncs_per_layer']:6.2f} {row['_local_scalar_dense_per_layer']:6.2f} "
                  f"{row['nonzero_per_layer']:7.2f} {row['tolist_per_layer']:6.2f} {row['cpu_per_layer']:5.2f} "
                  f"{row['aten_ops_per_layer']:9.1f} {row['ms_per_prompt']:10.2f} {row['gpu_ms_per_prompt']:7.2f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "device": str(device), "tokens": args.tokens,
                                        "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
