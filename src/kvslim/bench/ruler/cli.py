"""``kvslim bench --suite ruler``: the RULER half of the benchmark command (options are declared once, in
:mod:`kvslim.bench.cli`). Mistakes in names are reported as one line before any model loads."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..config import default_dtype, parse_keeps, parse_lengths, parse_list, parse_policies
from ..launch import launch
from .config import DEFAULT_POLICIES, DEFAULT_SAMPLES, LEADERBOARD_KEEPS, RulerConfig
from .protocols import parse_protocols
from .report import leaderboard_md, skipped_notes
from .runner import run_ruler
from .tasks import ruler_tasks

DEFAULTS: dict[str, Any] = {
    "model": "qwen2.5-coder-0.5b", "policies": ",".join(DEFAULT_POLICIES),
    "keep": ",".join(f"{k:g}" for k in LEADERBOARD_KEEPS), "tasks": ",".join(ruler_tasks()), "lengths": "4k",
    "samples": DEFAULT_SAMPLES, "batch_size": 8,
}


def config_from_args(args: argparse.Namespace) -> RulerConfig:
    """Parse the string options; raises ``ValueError`` with the accepted format on bad input."""
    def get(name: str) -> Any:
        value = getattr(args, name)
        return DEFAULTS[name] if value is None else value

    if args.chat and args.no_chat:
        raise ValueError("--chat and --no-chat contradict each other: give one")
    samples = args.limit if args.limit is not None else get("samples")
    workers = 1 if args.workers is None else parse_workers(args.workers)
    return RulerConfig(
        model=get("model"), policies=parse_policies(get("policies"), args.kv_cache_dtype, args.kv_scale),
        keeps=parse_keeps(get("keep")),
        tasks=parse_list(get("tasks")), lengths=parse_lengths(get("lengths")), samples=samples,
        protocols=parse_protocols(args.protocols), out=args.out or "results/ruler", device=args.device,
        dtype=default_dtype(args.dtype, args.device), seed=args.seed, batch_size=get("batch_size"),
        chat=True if args.chat else False if args.no_chat else None, engine=args.engine, kv_memory=args.kv_memory,
        workers=workers, report_only=args.report_only,
    )


def parse_workers(text: str) -> int:
    """``--workers``: a whole number (range-checked by :meth:`RulerConfig.validate`)."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--workers {text!r}: give a positive whole number of worker processes, e.g. --workers 4"
                         ) from None


def main(args: argparse.Namespace) -> int:
    """Run RULER as the arguments describe and print the leaderboard; returns the exit code."""
    config, summary = launch(lambda: config_from_args(args), run_ruler, not args.no_progress)
    if isinstance(summary, int):
        return summary
    settings = summary["settings"]
    print(leaderboard_md(summary["leaderboard"], config.keeps, config.model))
    if summary["engine_skipped"]:
        print(skipped_notes(summary["engine_skipped"]))
    for error in settings["worker_errors"]:
        print(f"kvslim bench: worker failed: {error}", file=sys.stderr)
    print(f"{settings['done']}/{settings['planned']} samples in {settings['elapsed_s']:.0f} s "
          f"({settings['ran_now']} run now); report: {Path(config.out) / 'report.md'}")
    return 1 if settings["worker_errors"] else 0
