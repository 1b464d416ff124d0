"""Benchmark harness: long-context tasks, runners and honest measurements of KV-cache methods.

``run_benchmark(BenchConfig(...))`` runs every task x length x sample through every policy run and
writes samples, summaries, figures and a report; ``kvslim bench`` is its command line (:mod:`.cli`).
RULER at the kvpress leaderboard's protocol, under query-aware and query-agnostic protocols, is the
:mod:`.ruler` package (``kvslim bench --suite ruler``).
"""
from .config import BenchConfig, Run, parse_lengths
from .harness import run_benchmark

__all__ = ["BenchConfig", "Run", "parse_lengths", "run_benchmark"]
