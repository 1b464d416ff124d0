"""RULER (Hsieh et al., 2024, arXiv:2404.06654) as the kvpress leaderboard runs it, for KV-cache methods.

The eleven non-QA tasks under RULER's names, templates and scores, sized in the model's own tokens;
every method at keep 0.75/0.5/0.25/0.125 (full once) under two protocols, query-aware and query-agnostic;
a leaderboard, per-task scores, per-sample losses against full and output-length change. ``kvslim bench
--suite ruler`` runs it (:mod:`.runner`). Importing this package registers the tasks.
"""
from . import cwe, fwe, niah, vt  # noqa: F401  (registration)
from .protocols import PROTOCOLS, QUERY_AGNOSTIC, QUERY_AWARE
from .tasks import QA_NOTE, RulerSample, get_ruler_task, ruler_tasks

__all__ = ["PROTOCOLS", "QA_NOTE", "QUERY_AGNOSTIC", "QUERY_AWARE", "RulerSample", "get_ruler_task", "ruler_tasks"]
