"""``kvslim bench``: the argparse half of the benchmark command (``kvslim.cli`` registers it).

``add_arguments(parser)`` declares the options, ``main_from_args(args)`` runs them and returns an exit
code. Mistakes in names (policy, task, model, dtype) are reported as one line, before any model loads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from ..models import resolve
from ..models.help import MODEL_HELP
from .config import BenchConfig, parse_keeps, parse_lengths, parse_list
from .harness import run_benchmark
from .report import print_summary
from .store import check_config

DEFAULT_DEMO = ["--model", "smollm2-135m", "--policies", "full,snapkv,streaming,kivi4,snapkv+kivi4", "--keep", "0.25",
                "--tasks", "passkey", "--lengths", "1k", "--samples", "5", "--out", "results/demo"]
"""The README's CPU demo: passkey at 1k tokens, 5 samples, keep 0.25 (a few minutes on 2 cores)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help=MODEL_HELP + " (default: smollm2-135m)")
    parser.add_argument("--policies", default="full,snapkv,streaming",
                        help="comma-separated policy specs, e.g. full,snapkv,pyramidkv,kivi2,snapkv+kivi4")
    parser.add_argument("--keep", default="0.5,0.25,0.125",
                        help="keep fractions for policies that take a budget (others run once)")
    parser.add_argument("--tasks", default="passkey", help="comma-separated tasks, e.g. passkey,needle,multikey,vt")
    parser.add_argument("--lengths", default="1k,2k", help="context lengths in tokens, e.g. 1k,2k,4k (k = 1024)")
    parser.add_argument("--samples", type=int, default=20, help="samples per task and length")
    parser.add_argument("--out", default=None, help="run directory; rerunning with the same one resumes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--seed", type=int, default=0, help="sample generation seed")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="sequences generated together (1 gives per-sample latencies)")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    parser.add_argument("--ppl-tokens", type=int, default=256, help="continuation tokens scored per perplexity sample")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--demo", action="store_true",
                        help="the small CPU demo: " + " ".join(DEFAULT_DEMO) + " (other options ignored)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Parse the string options; raises ``ValueError`` with the accepted format on bad input."""
    return BenchConfig(
        model=args.model, policies=parse_list(args.policies), keeps=parse_keeps(args.keep),
        tasks=parse_list(args.tasks), lengths=parse_lengths(args.lengths), samples=args.samples,
        out=args.out or "results/bench", device=args.device, dtype=args.dtype, seed=args.seed,
        batch_size=args.batch_size, chat=args.chat, ppl_tokens=args.ppl_tokens,
    )


def main_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark the arguments describe, print the summary table; returns the exit code."""
    if args.demo:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(DEFAULT_DEMO + (["--no-progress"] if args.no_progress else []))
    console = Console()
    try:
        config = config_from_args(args)
        config.validate()
        check_config(Path(config.out), config.identity())
        if not resolve(config.model).real_weights:
            raise ValueError(f"model {config.model!r} has random weights and no tokenizer: benchmark a real model "
                             "(smollm2-135m, qwen2.5-coder-0.5b, a model directory, a .gguf file)")
    except ValueError as err:
        print(f"kvslim bench: error: {err}", file=sys.stderr)
        return 2
    try:
        summary = run_benchmark(config, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished samples are kept in {config.out}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    settings = summary["settings"]
    print_summary(summary["rows"], f"{config.model} on {config.device}, {settings['prompt_format']} prompts",
                  console)
    console.print(f"{settings['done']}/{settings['planned']} samples in {settings['elapsed_s']:.0f} s "
                  f"({settings['ran_now']} run now); report: {Path(config.out) / 'report.md'}")
    return 0
