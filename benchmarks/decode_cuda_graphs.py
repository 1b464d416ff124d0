"""Decode step time of the engine with and without CUDA graphs, on random-weight models (bf16, CUDA).

For each model shape and batch size, ``batch`` requests of ``--prompt`` tokens are prefilled, then:

* ``forward``: the model's decode step alone on one fixed batch, a graph replay (:meth:`DecodeGraphs.run`)
  against the eager :meth:`ModelRunner.forward_decode`, the logits left out; wall time from launch to a synchronized end,
  median of ``--iters`` (a step ends in a synchronization anyway: sampling reads the logits);
* ``engine step``: ``LLMEngine.step()`` (scheduling, inputs, decode, sampling) with graphs, then with
  ``enforce_eager``, then with graphs again (the spread of the two graph runs is the noise);
* ``first step``: the first decode step of a new batch size, its capture (and kernel compiles) included.

    python benchmarks/decode_cuda_graphs.py --out benchmarks/results/decode_cuda_graphs_h100.json
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from timing import wall
from transformers import AutoModelForCausalLM

from kvslim.engine import LLM, SamplingParams
from kvslim.models import load_config

#: (model, policy, kv_memory GiB, batch sizes)
RUNS = (("smollm2-135m", "full", 4.0, (1, 8, 32, 128)), ("smollm2-135m", "kivi4", 4.0, (1, 32)),
        ("llama-3.1-8b", "full", 16.0, (1, 8, 32)))


def random_model(name: str) -> Any:
    """``name``'s architecture with seeded random bf16 weights made on the GPU (SmolLM2's real ones are not needed
    for timing)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(load_config(name), dtype=torch.bfloat16, attn_implementation="sdpa").eval()


def measure(model: Any, policy: str, kv_memory: float, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    llm = LLM(model, policy=policy, kv_memory=kv_memory, max_num_seqs=batch)
    runner = llm.runner
    gen = torch.Generator().manual_seed(batch)
    vocab, room = model.config.vocab_size, runner.max_model_len - args.prompt
    for _ in range(batch):
        llm.add_request(torch.randint(0, vocab, (args.prompt,), generator=gen).tolist(),
                        SamplingParams(max_tokens=room, ignore_eos=True))
    while llm.scheduler.waiting:  # every prompt prefilled: the next step is the batch's first decode
        llm.step()
    prepare, seen = runner.prepare_decode, []
    runner.prepare_decode = lambda seqs: seen.append(prepare(seqs)) or seen[-1]  # keep the step's batch
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.step()  # the first replay of this batch size: captures its graph
    torch.cuda.synchronize()
    first_ms = 1e3 * (time.perf_counter() - start)
    runner.prepare_decode = prepare
    fixed = seen[-1]  # rerunning a step's forward on its batch rewrites the same slots with the same numbers
    forward_graph = wall(lambda: runner.graphs.run(fixed), args.iters)
    forward_eager = wall(lambda: runner.forward_decode(fixed), args.iters)

    def engine(eager: bool) -> float:
        runner.enforce_eager = eager
        return wall(llm.step, args.steps)

    graph_steps = [engine(False), engine(True), engine(False)]
    return {"batch": batch, "context": args.prompt, "first_step_ms_incl_capture": first_ms,
            "forward_graph_ms": forward_graph, "forward_eager_ms": forward_eager,
            "forward_speedup": forward_eager / forward_graph,
            "step_graph_ms": [graph_steps[0], graph_steps[2]], "step_eager_ms": graph_steps[1],
            "step_speedup": graph_steps[1] / statistics.mean([graph_steps[0], graph_steps[2]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens per request")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--models", nargs="*", default=None, help="only these models of RUNS")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_cuda_graphs.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_cuda_graphs needs a CUDA GPU")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report: dict[str, Any] = {"benchmark": "decode_cuda_graphs", "device": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "commit": commit, "weights": "RANDOM, bfloat16",
                              "timing": __doc__.split("\n\n")[1].strip(), "results": []}
    loaded: dict[str, Any] = {}
    for name, policy, kv_memory, batches in RUNS:
        if args.models and name not in args.models:
            continue
        if name not in loaded:
            loaded.clear()
            torch.cuda.empty_cache()
            loaded[name] = random_model(name)
        for batch in batches:
            gc.collect()  # the last engine's pool and graphs go before the next one allocates
            row = {"model": name, "policy": policy, **measure(loaded[name], policy, kv_memory, batch, args)}
            report["results"].append(row)
            print(json.dumps(row), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
    print(f"{'model':14} {'policy':6} {'B':>4} {'fwd eager':>10} {'fwd graph':>10} {'x':>5} {'step eager':>11} "
          f"{'step graph':>11} {'x':>5}")
    for r in report["results"]:
        print(f"{r['model']:14} {r['policy']:6} {r['batch']:4d} {r['forward_eager_ms']:10.3f} {r['forward_graph_ms']:10.3f} "
              f"{r['forward_speedup']:5.2f} {r['step_eager_ms']:11.3f} {min(r['step_graph_ms']):11.3f} {r['step_speedup']:5.2f}")


if __name__ == "__main__":
    main()
