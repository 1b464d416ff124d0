"""``run_ruler``: every RULER task x length x sample through every policy run under every protocol,
resumable, with the leaderboard, figure and report rebuilt from the per-sample log at the end.

The run directory works as for ``kvslim bench`` (:mod:`kvslim.bench.harness`): ``samples.jsonl`` is the
result and the resume log (a record's key includes its protocol and backend), and outputs are rebuilt in a
``finally``. On the Hugging Face path batches hold samples of one task and length, whose prompts are within a
haystack unit of each other, so padding wastes little; every run and protocol measures a batch before the
next batch starts. With ``--engine`` a batch is every sample of a run, protocol and length (:mod:`.engine`).
"""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm

from ...models import load_model
from ..memory import PeakMemory
from ..config import Run
from ..store import CONFIG, HF, Key, SampleLog, check_config, write_atomic, write_json
from . import essays, leaderboard, plot, report
from .config import RulerConfig
from .engine import ENGINE, Refused, run_batches
from .execute import generate_batch, stop_ids
from .prompt import Framing
from .tasks import RulerSample, RulerTask, get_ruler_task

Loader = Callable[[RulerConfig], tuple[Any, Any]]


def _load(config: RulerConfig) -> tuple[Any, Any]:
    return load_model(config.model, dtype=config.torch_dtype, device=config.device)


def run_ruler(config: RulerConfig, progress: bool = True, loader: Loader | None = None) -> dict[str, Any]:
    """Run (or resume) RULER as ``config`` describes and write every output into ``config.out``.

    ``loader`` builds ``(model, tokenizer)`` (default :func:`kvslim.models.load_model`); tests pass a tiny
    model with a tokenizer built in code. Returns the content of ``summary.json``.
    """
    runs = config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config.identity())
    write_json(out / CONFIG, {"identity": config.identity(), "config": config.to_dict()})
    log = SampleLog(out)
    started = time.perf_counter()
    model, tokenizer = (loader or _load)(config)
    if tokenizer is None:
        raise ValueError(f"model {config.model!r} comes without a tokenizer; RULER needs a real model's")
    chat = config.chat if config.chat is not None else bool(getattr(tokenizer, "chat_template", None))
    framing = Framing(tokenizer, chat)
    memory = PeakMemory(next(model.parameters()).device)
    work = [(task, length, task.generate(config.samples, length, framing, config.seed))
            for task in map(get_ruler_task, config.tasks) for length in config.lengths]
    setup_s = time.perf_counter() - started
    backend, other = (ENGINE, HF) if config.engine else (HF, ENGINE)
    planned = [(task.name, length, s.id, run.policy, run.keep, protocol, backend) for task, length, samples in work
               for run in runs for protocol in config.protocols for s in samples]
    done = log.finished(runs)

    bar = tqdm(total=len(planned), initial=sum(map(done, planned)), disable=not progress, unit="sample",
               dynamic_ncols=True)
    ran = 0
    skipped: list[dict[str, Any]] = []
    batches = _engine_batches(model, tokenizer, config, runs, work, done, bar, skipped) if config.engine \
        else _hf_batches(model, tokenizer, config, runs, work, done, bar, memory)
    try:
        for records in batches:
            for record in records:
                log.append(record)
            ran += len(records)
            bar.update(len(records))
    finally:
        bar.close()
        records = [log.records[k] for k in planned if done(k)]
        counterpart = [log.records[k[:-1] + (other,)] for k in planned if done(k[:-1] + (other,))]
        state = {"planned": len(planned), "done": len(records), "ran_now": ran,
                 "elapsed_s": round(time.perf_counter() - started, 1), "setup_s": round(setup_s, 1)}
        engine, hf = (records, counterpart) if config.engine else (counterpart, records)
        summary = write_outputs(out, config, runs, records, chat, memory.kind, state,
                                leaderboard.engine_rows(engine, hf, runs), skipped)
    return summary


Work = list[tuple[RulerTask, int, list[RulerSample]]]


def _hf_batches(model: Any, tokenizer: Any, config: RulerConfig, runs: list[Run], work: Work,
                done: Callable[[Key], bool], bar: tqdm, memory: PeakMemory) -> Iterator[list[dict[str, Any]]]:
    """``kvslim.Cache`` batches of ``batch_size`` samples of one task and length; every run and protocol measures
    a batch before the next batch starts."""
    for task, length, samples in work:
        for i in range(0, len(samples), config.batch_size):
            for run in runs:
                for protocol in config.protocols:
                    batch = [s for s in samples[i:i + config.batch_size]
                             if not done((task.name, length, s.id, run.policy, run.keep, protocol, HF))]
                    if batch:
                        bar.set_description(f"{task.name} {length} {run.label} {protocol}")
                        yield generate_batch(model, tokenizer, task, batch, run, protocol, memory)


def _engine_batches(model: Any, tokenizer: Any, config: RulerConfig, runs: list[Run], work: Work,
                    done: Callable[[Key], bool], bar: tqdm, skipped: list[dict[str, Any]]
                    ) -> Iterator[list[dict[str, Any]]]:
    """One engine batch per run, protocol and length: every task's samples not yet done, submitted at once; a run
    the engine refuses is noted in ``skipped`` (label, protocol, length, reason) and left out."""
    stops = stop_ids(model, tokenizer)
    kv_memory: float = config.kv_memory  # type: ignore[assignment]  (RulerConfig.validate requires it with --engine)

    def pending(run: Run, protocol: str, length: int) -> list[tuple[RulerTask, RulerSample]]:
        return [(task, s) for task, at, samples in work if at == length for s in samples
                if not done((task.name, length, s.id, run.policy, run.keep, protocol, ENGINE))]

    for run in runs:
        todo = [(protocol, length, pending(run, protocol, length)) for protocol in config.protocols
                for length in config.lengths]
        todo = [(protocol, length, batch) for protocol, length, batch in todo if batch]
        if not todo:
            continue
        bar.set_description(f"engine {run.label}: {sum(len(b) for _, _, b in todo)} samples, a batch at once")
        for protocol, length, records in run_batches(model, tokenizer, run, todo, stops, kv_memory):
            if isinstance(records, Refused):
                skipped.append({"label": run.label, "protocol": protocol, "length": length, "reason": str(records)})
            else:
                yield records


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
