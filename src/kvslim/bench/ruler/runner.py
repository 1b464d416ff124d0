"""``run_ruler``: every RULER task x length x sample through every policy run under every protocol,
resumable, with the leaderboard, figure and report rebuilt from the per-sample log at the end.

The run directory works as for ``kvslim bench`` (:mod:`kvslim.bench.harness`): ``samples.jsonl`` is the
result and the resume log (a record's key includes its protocol and backend), and outputs are rebuilt in a
``finally``. The batches come from :mod:`.units`, in this process or, with ``workers`` > 1, in worker
processes (:mod:`.workers`) whose records this process appends to the same log.
"""
from __future__ import annotations

import gc
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm

from ..config import Run
from ..store import CONFIG, HF, Key, SampleLog, check_config, write_atomic, write_json
from . import essays, leaderboard, plot, report
from .config import RulerConfig
from .engine import ENGINE
from .units import Loader, load, prepare, unit_batches
from .workers import absorb_leftovers, worker_batches


def run_ruler(config: RulerConfig, progress: bool = True, loader: Loader | None = None) -> dict[str, Any]:
    """Run (or resume) RULER as ``config`` describes and write every output into ``config.out``.

    ``loader`` builds ``(model, tokenizer)`` (default :func:`kvslim.models.load_model`); tests pass a tiny
    model with a tokenizer built in code (with workers, a module-level function: each worker process calls it).
    Returns the content of ``summary.json``.
    """
    runs = config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config.identity())
    write_json(out / CONFIG, {"identity": config.identity(), "config": config.to_dict()})
    log = SampleLog(out)
    absorb_leftovers(log)
    started = time.perf_counter()
    # report_only needs the tokenizer and the samples' ids, not the device the results came from
    setup = prepare(replace(config, device="cpu") if config.report_only else config, loader or load)
    chat, memory_kind = setup.chat, setup.memory.kind
    setup_s = time.perf_counter() - started
    backend = ENGINE if config.engine else HF
    planned = [(task.name, length, s.id, run.policy, run.keep, protocol, backend) for task, length, samples
               in setup.work for run in runs for protocol in config.protocols for s in samples]
    done = log.finished(runs)

    bar = tqdm(total=len(planned), initial=sum(map(done, planned)), disable=not progress, unit="sample",
               dynamic_ncols=True)
    ran = 0
    refused: list[dict[str, Any]] = []
    failed: list[str] = []
    if config.report_only:
        batches: Iterator[list[dict[str, Any]]] = iter(())
    elif config.workers > 1:
        del setup  # the workers load their own; this process only gathers
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        batches = worker_batches(config, runs, planned, log, loader or load, bar, refused, failed)
    else:
        batches = unit_batches(setup, config, runs, done, bar, refused)
    try:
        for records in batches:
            log.extend(records)
            ran += len(records)
            bar.update(len(records))
    finally:
        bar.close()
        if config.workers > 1 and not config.report_only:  # interrupted: what the workers' cut-short units finished
            batches.close()  # type: ignore[attr-defined]  # the workers stop before their shards are read
            ran += absorb_leftovers(log)
        records = _final_records(log, planned, done, refused, config.report_only) if config.engine \
            else [log.records[k] for k in planned if done(k)]
        engine_records = [r for r in records if r.get("backend", HF) == ENGINE]
        other = HF if config.engine else ENGINE
        counterpart = [log.records[k[:-1] + (other,)] for k in planned if done(k[:-1] + (other,))]
        state = {"planned": len(planned), "done": len(records), "ran_now": ran,
                 "elapsed_s": round(time.perf_counter() - started, 1), "setup_s": round(setup_s, 1),
                 "workers": config.workers, "worker_errors": failed}
        engine, hf = (engine_records, counterpart) if config.engine else (counterpart, records)
        summary = write_outputs(out, config, runs, records, chat, memory_kind, state,
                                leaderboard.engine_rows(engine, hf, runs), refused)
    return summary


def _final_records(log: SampleLog, planned: list[Key], done: Callable[[Key], bool], refused: list[dict[str, Any]],
                   any_fallback: bool = False) -> list[dict[str, Any]]:
    """An engine run's records: the engine's, and where it refused a policy run, protocol and length, the Hugging
    Face path's that ran instead (the directory may hold the HF path's records of other runs too: only these;
    ``any_fallback``: a report rebuilt without running, which cannot know the refusals, takes every HF record
    where the engine has none)."""
    instead = {(r["label"], r["protocol"], r["length"]) for r in refused}
    records = []
    for key in planned:
        fallback = key[:-1] + (HF,)
        if done(key):
            records.append(log.records[key])
        elif (any_fallback or (Run(key[3], key[4]).label, key[5], key[1]) in instead) and done(fallback):
            records.append(log.records[fallback])
    return records


def write_outputs(out: Path, config: RulerConfig, runs: list[Any], records: list[dict[str, Any]], chat: bool,
                  peak_mem_kind: str, state: dict[str, Any], engine: list[dict[str, Any]],
                  skipped: list[dict[str, Any]]) -> dict[str, Any]:
    """leaderboard.md/.csv, per-task and loss tables, the figure, summary.json and report.md; with ``engine`` rows
    (:func:`.leaderboard.engine_rows`) or ``skipped`` engine runs, engine.csv and the report's engine tables."""
    board = leaderboard.board(records, runs)
    tasks = leaderboard.task_rows(records)
    lost = leaderboard.losses(records, runs)
    lengths = leaderboard.length_change(records, runs)
    figure = plot.score_vs_kv(board, out / "score_vs_kv.png")
    settings = {
        "command": config.command(), "model": config.model, "device": config.device, "dtype": config.dtype,
        "tasks": config.tasks, "lengths": config.lengths, "samples": config.samples, "keeps": config.keeps,
        "protocols": config.protocols, "runs": [r.label for r in runs],
        "specs": {r.label: r.build().spec for r in runs}, "seed": config.seed, "batch_size": config.batch_size,
        "backend": f"engine, KV pool of {config.kv_memory:g} GiB" if config.engine else "kvslim.Cache (Hugging Face)",
        "prompt_format": "the tokenizer's chat template around the task, answer prefix after the generation "
                         "prompt (RULER's instruct setting)" if chat else "plain text (RULER's base template)",
        "essay_source": essays.SOURCE, "peak_mem_kind": peak_mem_kind, "torch": torch.__version__,
        "transformers": transformers.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **state,
    }
    summary = {"settings": settings, "leaderboard": board, "per_task": tasks, "losses": lost,
               "output_length": lengths, "engine": engine, "engine_skipped": skipped,
               "figures": [figure.name] if figure else []}
    write_json(out / "summary.json", summary)
    write_atomic(out / "leaderboard.csv", report.rows_csv(board, report.BOARD_CSV))
    write_atomic(out / "leaderboard.md", report.leaderboard_md(board, config.keeps, config.model))
    write_atomic(out / "per_task.csv", report.rows_csv(tasks, ["protocol", "length", "policy", "keep", "task", "n",
                                                                "score", "output_tokens"]))
    if engine:
        write_atomic(out / "engine.csv", report.rows_csv(engine, report.ENGINE_CSV))
    write_atomic(out / "report.md", report.write_report(settings, board, tasks, lost, lengths, runs,
                                                        figure.name if figure else None, engine, skipped))
    return summary
