"""``--workers N``: a RULER run's policy runs (each policy x keep, what one engine run is) spread over N worker
processes on the same device, each with its own model (and, with ``--engine``, its own engine and KV pool).

Why processes: a small model leaves the device mostly idle while one process prepares batches, syncs and
schedules in Python; N processes keep it busy. Each unit (one policy run) goes to whichever worker is free.

Only the parent writes ``samples.jsonl``. A worker appends each finished batch to its unit's own log under
``shards/`` in the run directory; when the unit ends (done or failed) the parent appends that log's records to
``samples.jsonl`` and deletes it, so a unit that fails keeps what it finished and never costs the others theirs.
A run killed before that finds the shard at its next start (:func:`absorb_leftovers`). The parent loads the
model once before any worker starts, so a GGUF file is converted (and cached on disk) once, not raced.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import Run
from ..store import Key, SampleLog, read_shard
from .config import RulerConfig
from .units import Loader, Setup, prepare, unit_batches

SHARDS = "shards"

_setup: Setup | None = None
"""A worker process's model and samples, loaded by its first unit and kept for the next ones."""


def absorb_leftovers(log: SampleLog) -> int:
    """Append the shards a killed run left behind to ``log`` and delete them; returns the records appended."""
    appended = 0
    for shard in sorted((log.path.parent / SHARDS).glob("*.jsonl")):
        records = read_shard(shard)
        log.extend(records)
        shard.unlink()
        appended += len(records)
    return appended


def worker_batches(config: RulerConfig, runs: list[Run], planned: list[Key], log: SampleLog, loader: Loader,
                   bar: tqdm, refused: list[dict[str, Any]], failed: list[str]) -> Iterator[list[dict[str, Any]]]:
    """Run every policy run with ``planned`` keys not done yet in ``config.workers`` processes; yields each unit's
    records when it ends (the caller appends them to ``log``), notes the engine's refusals in ``refused`` and each
    unit that failed, as one line naming it and its error, in ``failed``."""
    done = log.finished(runs)
    left = {key[3:5] for key in planned if not done(key)}
    # Keep-major order, in the order --keep gives them (the keep that matters most first, so a run cut short by a
    # time limit has it whole): the units running at once are different policies, so a slow one does not fill
    # every worker at the same time. Runs without a keep (full, per-request budgets) go first.
    runs = sorted((run for run in runs if (run.policy, run.keep) in left),
                  key=lambda run: -1 if run.keep is None else config.keeps.index(run.keep))
    if not runs:
        return
    shards = log.path.parent / SHARDS
    shards.mkdir(exist_ok=True)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    pool = ProcessPoolExecutor(config.workers, mp_context=context)
    try:
        units: dict[Future[list[dict[str, Any]]], tuple[Run, Path]] = {}
        for number, run in enumerate(runs):
            finished = {key for key in log.records if key[3:5] == (run.policy, run.keep) and done(key)}
            shard = shards / f"unit-{number}.jsonl"
            units[pool.submit(run_unit, config, run, finished, shard, loader)] = (run, shard)
        bar.set_description(f"{len(units)} policy runs in {config.workers} workers")
        for future in as_completed(units):
            run, shard = units[future]
            error = future.exception()
            if error is None:
                refused.extend(future.result())
            else:
                failed.append(f"{run.label}: {type(error).__name__}: {' '.join(str(error).split())}")
            if shard.exists():
                yield read_shard(shard)
                shard.unlink()
    except BaseException:  # Ctrl-C, a time limit, the caller closing us: stop now, not after the running units
        pool.shutdown(wait=False, cancel_futures=True)
        for process in multiprocessing.active_children():
            process.terminate()
        raise
    pool.shutdown(wait=True)


def run_unit(config: RulerConfig, run: Run, finished: set[Key], shard: Path, loader: Loader
             ) -> list[dict[str, Any]]:
    """In a worker: run one policy run's samples not in ``finished``, appending each batch to ``shard``; returns
    what the engine refused (noted as :func:`.units.unit_batches` notes it)."""
    global _setup
    if _setup is None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.workers))  # the workers share the cores
        _setup = prepare(config, loader)
    log = SampleLog(shard.parent, shard.name)
    refused: list[dict[str, Any]] = []
    quiet = tqdm(disable=True)
    for records in unit_batches(_setup, config, [run], finished.__contains__, quiet, refused):
        log.extend(records)
    gc.collect()
    return refused
