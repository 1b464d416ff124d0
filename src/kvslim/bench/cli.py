"""``kvslim bench``: the argparse half of the benchmark command (``kvslim.cli`` registers it).

``add_arguments(parser)`` declares the options, ``main_from_args(args)`` runs them and returns an exit
code. Mistakes in names (policy, task, model, dtype) are reported as one line, before any model loads.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

from ..cli import add_kv_cache_dtype_args
from ..models.help import MODEL_HELP
from .config import BenchConfig, default_dtype, parse_keeps, parse_lengths, parse_list, parse_policies
from .harness import run_benchmark
from .launch import launch
from .report import print_summary
from .ruler.cli import main as ruler_main

DEFAULT_DEMO = ["--model", "smollm2-135m", "--policies", "full,snapkv,streaming,kivi4,snapkv+kivi4", "--keep", "0.25",
                "--tasks", "passkey", "--lengths", "1k", "--samples", "5", "--out", "results/demo"]
"""The README's CPU demo: passkey at 1k tokens, 5 samples, keep 0.25 (a few minutes on 2 cores)."""


CUSTOM_DEFAULTS = {"model": "smollm2-135m", "policies": "full,snapkv,streaming", "keep": "0.5,0.25,0.125",
                   "tasks": "passkey", "lengths": "1k,2k", "samples": 20, "batch_size": 1}
"""Defaults of the custom suite (kvslim's own tasks); ``--suite ruler`` has its own (:mod:`.ruler.cli`)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=["custom", "ruler"], default="custom",
                        help="custom: kvslim's own tasks (default); ruler: RULER's eleven non-QA tasks at the kvpress "
                             "leaderboard protocol (keeps 0.75,0.5,0.25,0.125, full once, both protocols, 4k, "
                             "qwen2.5-coder-0.5b, 50 samples per task)")
    parser.add_argument("--model", default=None,
                        help=MODEL_HELP + " (default: smollm2-135m; ruler: qwen2.5-coder-0.5b)")
    parser.add_argument("--policies", default=None,
                        help="comma-separated policy specs, e.g. full,snapkv,pyramidkv,kivi2,snapkv+kivi4 "
                             "(default: full,snapkv,streaming; ruler: full and every eviction method)")
    add_kv_cache_dtype_args(parser)
    parser.add_argument("--keep", default=None,
                        help="keep fractions for policies that take a budget, others run once "
                             "(default: 0.5,0.25,0.125; ruler: 0.75,0.5,0.25,0.125)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks, e.g. passkey,needle,multikey,vt (default: passkey; "
                             "ruler: all eleven, e.g. niah_single_1,vt,cwe)")
    parser.add_argument("--lengths", default=None,
                        help="context lengths in tokens, e.g. 1k,2k,4k (k = 1024; default: 1k,2k; ruler: 4k)")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per task and length (default: 20; ruler: 50)")
    parser.add_argument("--limit", type=int, default=None, help="ruler: samples per task and length for a smoke run")
    parser.add_argument("--protocols", default="both",
                        help="ruler: query-aware, query-agnostic or both (default)")
    parser.add_argument("--out", default=None, help="run directory; rerunning with the same one resumes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="sample generation seed")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences generated together (default: 1, which gives per-sample latencies; ruler: 8)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap prompts in the tokenizer's chat template (ruler does when the tokenizer has one)")
    parser.add_argument("--no-chat", action="store_true", help="ruler: plain prompts even for an instruct model")
    parser.add_argument("--engine", action="store_true",
                        help="ruler: generate through the paged engine (every prompt of a policy at once, continuous "
                             "batching) and report max running sequences, output tok/s, TTFT and agreement with the "
                             "Hugging Face path's answers in the same --out")
    parser.add_argument("--kv-memory", type=float, default=None, help="ruler --engine: the KV pool in GiB, e.g. 2")
    parser.add_argument("--workers", default=None,
                        help="ruler: worker processes running the policy runs at once on the same device, each with "
                             "its own model (and engine and --kv-memory pool); default 1")
    parser.add_argument("--report-only", action="store_true",
                        help="ruler: rebuild the leaderboard, figure and report of --out from its samples.jsonl, running "
                             "nothing (cells never run stay empty); give the run's --device and --dtype, it loads "
                             "only the tokenizer's model on the CPU")
    parser.add_argument("--ppl-tokens", type=int, default=256, help="continuation tokens scored per perplexity sample")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--demo", action="store_true",
                        help="the small CPU demo: " + " ".join(DEFAULT_DEMO) + " (other options ignored)")


def _option(args: argparse.Namespace, name: str, defaults: dict[str, Any]) -> Any:
    value = getattr(args, name)
    return defaults[name] if value is None else value


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Parse the string options; raises ``ValueError`` with the accepted format on bad input."""
    def get(name: str) -> Any:
        return _option(args, name, CUSTOM_DEFAULTS)

    if args.workers is not None:
        raise ValueError("--workers spreads RULER's policy runs over processes: add --suite ruler, or leave it out")
    if args.report_only:
        raise ValueError("--report-only rebuilds a RULER run's report: add --suite ruler, or leave it out")

    return BenchConfig(
        model=get("model"), policies=parse_policies(get("policies"), args.kv_cache_dtype, args.kv_scale),
        keeps=parse_keeps(get("keep")),
        tasks=parse_list(get("tasks")), lengths=parse_lengths(get("lengths")), samples=get("samples"),
        out=args.out or "results/bench", device=args.device, dtype=default_dtype(args.dtype, args.device), seed=args.seed,
        batch_size=get("batch_size"), chat=args.chat, ppl_tokens=args.ppl_tokens,
    )


def main_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark the arguments describe, print the summary table; returns the exit code."""
    if args.suite == "ruler" and not args.demo:
        return ruler_main(args)
    if args.demo:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(DEFAULT_DEMO + (["--no-progress"] if args.no_progress else []))
    console = Console()
    config, summary = launch(lambda: config_from_args(args), run_benchmark, not args.no_progress)
    if isinstance(summary, int):
        return summary
    settings = summary["settings"]
    print_summary(summary["rows"], f"{config.model} on {config.device}, {settings['prompt_format']} prompts",
                  console)
    console.print(f"{settings['done']}/{settings['planned']} samples in {settings['elapsed_s']:.0f} s "
                  f"({settings['ran_now']} run now); report: {Path(config.out) / 'report.md'}")
    return 0
