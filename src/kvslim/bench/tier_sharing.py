"""Two engine processes, one Redis: does the second serve a shared long prefix faster than recomputing it?

The first process (the *writer*) serves a prompt that starts with a long shared prefix; its engine
writes the prefix's blocks to the tier. The second process (the *reader*), a separate engine with a
cold device pool, then serves (a) a prompt of the same length with a prefix nobody computed (recompute:
its time to first token is a full prefill) and (b) the shared prefix with its own suffix (its blocks come
from the tier). Reported: both times to first token and their ratio, the prompt tokens loaded from the
tier, and the tier's bytes and hits. Token ids are synthetic (seeded), so any model name works.

    python -m kvslim.bench.tier_sharing --model smollm2-135m --prefix-tokens 2048 --out result.json
    python -m kvslim.bench.tier_sharing --kv-tier redis://10.0.0.5:6379 ...   # an existing server
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WARMUP_TOKENS = 64


def _tokens(seed: int, n: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, vocab) for _ in range(n)]


def instance(role: str, model_name: str, kv_tier: str, prefix_tokens: int, suffix_tokens: int, policy: str,
             max_tokens: int) -> dict[str, Any]:
    """Run one engine process's part and return what it measured."""
    import torch

    from ..engine import LLM, SamplingParams
    from ..models import load_model

    model, _ = load_model(model_name)
    vocab = model.config.vocab_size
    llm = LLM(model, policy=policy, kv_memory=1.0, kv_tier=kv_tier)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    shared = _tokens(0, prefix_tokens, vocab)
    own = _tokens(1 if role == "writer" else 2, suffix_tokens, vocab)
    llm.generate([_tokens(3 if role == "writer" else 5, WARMUP_TOKENS, vocab)], params)  # first-call costs, no sharing
    result: dict[str, Any] = {"role": role, "torch_threads": torch.get_num_threads()}
    if role == "reader":
        cold = llm.generate([_tokens(4, prefix_tokens, vocab) + own], params)[0]
        result["recompute"] = {"ttft_s": cold.stats["ttft_s"], "tier_prompt_tokens": cold.stats["tier_prompt_tokens"]}
    out = llm.generate([shared + own], params)[0]
    result["shared"] = {"ttft_s": out.stats["ttft_s"], "prompt_tokens": out.stats["prompt_tokens"],
                        "tier_prompt_tokens": out.stats["tier_prompt_tokens"],
                        "cached_prompt_tokens": out.stats["cached_prompt_tokens"], "token_ids": out.token_ids}
    llm.close()  # waits for the writes, so the next process finds them
    result["tier"] = llm.tier.stats.as_dict()  # type: ignore[union-attr]
    return result


def _spawn(role: str, args: argparse.Namespace, kv_tier: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "kvslim.bench.tier_sharing", "--role", role, "--kv-tier", kv_tier,
               "--model", args.model, "--prefix-tokens", str(args.prefix_tokens), "--suffix-tokens",
               str(args.suffix_tokens), "--policy", args.policy, "--max-tokens", str(args.max_tokens)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{role} process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _commit() -> str:
    """The code's git commit (with ``+dirty`` when the tree has changes), for the results' record."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    head = git("rev-parse", "HEAD")
    if not head:
        return "not a git checkout"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def measure(args: argparse.Namespace, kv_tier: str) -> dict[str, Any]:
    """Writer, then reader, as two processes over ``kv_tier``; the reader's TTFT ratio."""
    started = time.perf_counter()
    writer = _spawn("writer", args, kv_tier)
    reader = _spawn("reader", args, kv_tier)
    recompute, shared = reader["recompute"]["ttft_s"], reader["shared"]["ttft_s"]
    return {
        "commit": _commit(), "model": args.model, "policy": args.policy, "kv_tier": kv_tier.split("://")[0],
        "prefix_tokens": args.prefix_tokens, "suffix_tokens": args.suffix_tokens,
        "reader_ttft_recompute_s": recompute, "reader_ttft_from_tier_s": shared,
        "ttft_ratio_recompute_over_tier": recompute / shared,
        "reader_tier_prompt_tokens": reader["shared"]["tier_prompt_tokens"],
        "writer": writer, "reader": reader, "wall_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvslim.bench.tier_sharing", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policy", default="full", help="full or a quantizer (kivi4, int8, ...): evictors do not share")
    parser.add_argument("--prefix-tokens", type=int, default=2048)
    parser.add_argument("--suffix-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--kv-tier", help="redis://HOST:PORT or disk:PATH (default: start a redis-server on loopback)")
    parser.add_argument("--role", choices=["writer", "reader"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help="write the result JSON here")
    args = parser.parse_args(argv)
    if args.prefix_tokens < 16 or args.suffix_tokens < 1:
        parser.error("--prefix-tokens must be >= 16 (one block) and --suffix-tokens >= 1")
    if args.role:
        print(json.dumps(instance(args.role, args.model, args.kv_tier, args.prefix_tokens, args.suffix_tokens,
                                  args.policy, args.max_tokens)))
        return 0
    if args.kv_tier:
        result = measure(args, args.kv_tier)
    else:
        from .redis_server import RedisServer

        with RedisServer() as server:
            result = measure(args, server.url)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("writer", "reader")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
