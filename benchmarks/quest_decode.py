"""Quest in the engine against the full cache: decode step time, KV bytes read per step and KV bytes held.

A random-weight bf16 model (default: the Llama-3.1-8B preset, made on the GPU), ``batch`` requests of
``--context`` random tokens each, prefilled; then per policy (``full``, then each ``quest(budget=N)``):

* ``step_ms``: ``LLMEngine.step()`` with CUDA graphs (scheduling, inputs, decode, sampling), median of ``--steps``
  wall times from launch to a synchronized end;
* ``forward_ms``: the decode forward alone, a graph replay on one fixed batch, median of ``--steps``;
* ``attend_ms``: one layer's attention as the step runs it (the store's ``attend``: write, then full paged
  decode, or Quest's block scoring, page choice and sparse paged decode), ``triton.testing.do_bench`` (median,
  L2 flushed between runs);
* ``kv_read_bytes_per_step``: KV bytes a step must read over every layer for the batch
  (:func:`kvslim.methods.quest.step_read_bytes`: Quest reads every block's key extrema plus ``budget`` tokens);
* ``kv_held_bytes``: bytes of the blocks the batch holds (Quest's are larger: it saves bandwidth, not memory).

Weights are random, so accuracy is not measured here: run RULER with the same specs for that.

    python benchmarks/quest_decode.py --context 32768 --batch 1 4 8 --budgets 1024 2048 \
        --out benchmarks/results/quest_decode_h200.json
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
from pathlib import Path
from typing import Any

import torch
import triton
from timing import wall
from transformers import AutoModelForCausalLM

from kvslim.engine import LLM, SamplingParams
from kvslim.methods.quest import step_read_bytes
from kvslim.models import load_config
from kvslim.shape import KVShape


def random_model(name: str) -> Any:
    """``name``'s architecture with seeded random bf16 weights made on the GPU."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        config = load_config(name)
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()


def measure(model: Any, shape: KVShape, policy: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    room = 3 * args.steps + 64  # decode steps this run takes, with margin
    kv_gib = batch * (args.context + room) * shape.bytes_per_token * 1.1 / 2**30 + 0.5
    llm = LLM(model, policy=policy, kv_memory=kv_gib, max_num_seqs=batch, max_prefill_tokens=args.context)
    runner = llm.runner
    gen = torch.Generator().manual_seed(batch)
    for _ in range(batch):  # the same prompts for every policy
        llm.add_request(torch.randint(0, model.config.vocab_size, (args.context,), generator=gen).tolist(),
                        SamplingParams(max_tokens=room, ignore_eos=True))
    while llm.scheduler.waiting:
        llm.step()
    prepare, seen = runner.prepare_decode, []
    runner.prepare_decode = lambda seqs: seen.append(prepare(seqs)) or seen[-1]  # keep the step's batch
    llm.step()  # the first decode step of this batch size: captures its graph
    runner.prepare_decode = prepare
    fixed = seen[-1]  # rerunning a step's forward on its batch rewrites the same slots with the same numbers
    step_ms = wall(llm.step, args.steps)
    forward_ms = wall(lambda: runner.graphs.run(fixed), args.steps)
    kv = runner.kv
    like = {"device": runner.device, "dtype": runner.dtype}
    q = torch.randn(batch, runner.num_heads, runner.head_dim, **like)
    k, v = (torch.randn(batch, runner.num_kv_heads, runner.head_dim, **like) for _ in "kv")
    with torch.inference_mode():
        attend_ms = triton.testing.do_bench(lambda: kv.attend(0, q, k, v, fixed, runner.scaling), return_mode="median")
    budget = getattr(llm.compression.storage, "budget", None)
    page = getattr(llm.compression.storage, "page", llm.blocks.block_size)
    return {"policy": policy, "batch": batch, "context": args.context, "step_ms": step_ms, "forward_ms": forward_ms,
            "attend_ms": attend_ms,
            "kv_read_bytes_per_step": batch * step_read_bytes(shape, args.context, budget, page),
            "kv_held_bytes": llm.blocks.num_used * llm.block_bytes, "graphs": runner.graphs is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a preset name (random weights)")
    parser.add_argument("--context", type=int, default=32768, help="prompt tokens per request")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048], help="Quest budgets (tokens read per step)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quest_decode.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("quest_decode needs a CUDA GPU")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    model = random_model(args.model)
    shape = KVShape.from_config(model.config)
    report: dict[str, Any] = {"benchmark": "quest_decode", "model": args.model, "weights": "RANDOM, bfloat16",
                              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit,
                              "timing": __doc__.split("\n\n")[1].strip(), "results": []}
    for batch in args.batch:
        for policy in ["full", *(f"quest(budget={b})" for b in args.budgets)]:
            gc.collect()  # the last engine's pool and graphs go before the next one allocates
            torch.cuda.empty_cache()
            row = measure(model, shape, policy, batch, args)
            report["results"].append(row)
            print(json.dumps(row), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
    full = {r["batch"]: r for r in report["results"] if r["policy"] == "full"}
    print(f"{'policy':20} {'B':>3} {'step ms':>8} {'fwd ms':>8} {'attn ms':>8} {'x step':>7} {'x attn':>7} "
          f"{'read/full':>9} {'held/full':>9}")
    for r in report["results"]:
        f = full[r["batch"]]
        print(f"{r['policy']:20} {r['batch']:3d} {r['step_ms']:8.2f} {r['forward_ms']:8.2f} {r['attend_ms']:8.3f} "
              f"{f['step_ms'] / r['step_ms']:7.2f} {f['attend_ms'] / r['attend_ms']:7.2f} "
              f"{r['kv_read_bytes_per_step'] / f['kv_read_bytes_per_step']:9.3f} "
              f"{r['kv_held_bytes'] / f['kv_held_bytes']:9.3f}")


if __name__ == "__main__":
    main()
