"""``run_benchmark``: every task x length x sample through every policy run, resumable, with a report.

The run directory is the unit of work. ``samples.jsonl`` gets one flushed line per finished sample and
doubles as the resume log, so an interrupted run loses at most the batch in flight and a rerun with the
same ``out`` picks up where it stopped. Summaries, figures and the report are rebuilt from that log in a
``finally`` block, so even Ctrl-C leaves a consistent directory behind.
"""
from __future__ import annotations

import csv
import io
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm

from ..models import load_model
from . import analysis, metrics, plots, report
from .config import BenchConfig, Run
from .execute import generate_batch, perplexity_sample
from .memory import PeakMemory
from .store import CONFIG, HF, SampleLog, check_config, write_atomic, write_json
from .tasks import get_task

Loader = Callable[[BenchConfig], tuple[Any, Any]]

CHAT_NOTE = (
    "Plain prompts are the default: on SmolLM2-135M-Instruct (passkey, 2048 tokens, full cache) they found 20/20 "
    "keys (benchmarks/results/cpu_smollm2_passkey/); the chat template found 0/10 in an older run, made before "
    "prompts ended at the answer's token boundary (its chat_template/ folder). `--chat` switches to the template, "
    "worth comparing on other models."
)


def _load(config: BenchConfig) -> tuple[Any, Any]:
    return load_model(config.model, dtype=config.torch_dtype, device=config.device)


def run_benchmark(config: BenchConfig, progress: bool = True, loader: Loader | None = None) -> dict[str, Any]:
    """Run (or resume) the benchmark described by ``config`` and write every output into ``config.out``.

    ``loader`` builds ``(model, tokenizer)`` from the config (default: :func:`kvslim.models.load_model`);
    tests pass a tiny model with a stand-in tokenizer. Returns the content of ``summary.json``.
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
        raise ValueError(f"model {config.model!r} comes without a tokenizer; benchmarks need one (smollm2-135m has)")
    load_s = time.perf_counter() - started
    memory = PeakMemory(next(model.parameters()).device)
    # Samples are cheap to make (milliseconds), so the whole plan is known before any model work.
    work = [(task, length, task.generate(config.samples, length, tokenizer, seed=config.seed))
            for task in map(get_task, config.tasks) for length in config.lengths]
    planned = [(task.name, length, s.id, run.policy, run.keep, None, HF) for task, length, samples in work
               for run in runs for s in samples]
    done = log.finished(runs)

    bar = tqdm(total=len(planned), initial=sum(map(done, planned)), disable=not progress, unit="sample",
               dynamic_ncols=True)
    ran = 0
    try:
        for task, length, samples in work:
            # Every run measures a batch before the next batch starts: on a shared machine, load changes
            # then hit all policies alike, and an interrupted run leaves them equally far.
            for i in range(0, len(samples), config.batch_size):
                for run in runs:
                    batch = [s for s in samples[i:i + config.batch_size]
                             if not done((task.name, length, s.id, run.policy, run.keep, None, HF))]
                    if not batch:
                        continue
                    bar.set_description(f"{task.name} {length} {run.label}")
                    if task.max_new_tokens == 0:  # a likelihood task (perplexity): nothing to generate
                        records = [perplexity_sample(model, tokenizer, s, run, config, memory) for s in batch]
                    else:
                        records = generate_batch(model, tokenizer, task, batch, run, config, memory)
                    for record in records:
                        log.append({**record, "load_avg": _load_avg()})
                    ran += len(records)
                    bar.update(len(records))
    finally:
        bar.close()
        records = [log.records[k] for k in planned if done(k)]
        # measured_s: generation time of every recorded sample (a batch once), the same after any resume;
        # elapsed_s and model_load_s are this invocation's own.
        state = {"planned": len(planned), "done": len(records), "ran_now": ran,
                 "measured_s": sum(r["gen_s"] / r["batch_size"] for r in records),
                 "elapsed_s": time.perf_counter() - started, "model_load_s": load_s}
        summary = write_outputs(out, config, runs, records, memory.kind, state)
    return summary


def write_outputs(out: Path, config: BenchConfig, runs: list[Run], records: list[dict[str, Any]],
                  peak_mem_kind: str, state: dict[str, Any]) -> dict[str, Any]:
    """Summaries (json, csv), figures and report.md from the records of this config's plan."""
    rows = metrics.summarize(records, config.tasks, runs)
    length_rows = metrics.summarize(records, config.tasks, runs, by_length=True)
    flips = analysis.flips(records, runs)
    settings = {
        "command": config.command(), "model": config.model, "device": config.device, "dtype": config.dtype, "tasks": config.tasks,
        "lengths": config.lengths, "samples": config.samples, "runs": [r.label for r in runs],
        "specs": {r.label: r.build().spec for r in runs}, "seed": config.seed,
        "batch_size": config.batch_size, "prompt_format": "chat" if config.chat else "plain", "chat": config.chat,
        "chat_note": CHAT_NOTE, "ppl_tokens": config.ppl_tokens, "peak_mem_kind": peak_mem_kind,
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "mean_load_avg": _mean_load(records), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        **{k: round(v, 1) if isinstance(v, float) else v for k, v in state.items()},
    }
    figures = [
        ("Quality against KV memory", plots.accuracy_vs_bytes(length_rows, config.tasks, runs,
                                                              out / "accuracy_vs_kv.png")),
        *[(f"{t}: accuracy by depth and length", plots.depth_heatmaps(records, t, runs, out / f"heatmap_{t}.png"))
          for t in config.tasks],
        ("Output length against full", plots.output_length_change(rows, config.tasks, runs,
                                                                  out / "output_length.png")),
    ]
    written = [(title, path.name) for title, path in figures if path is not None]
    summary = {"settings": settings, "rows": rows, "by_length": length_rows, "flips": flips,
               "figures": [name for _, name in written]}
    write_json(out / "summary.json", summary)
    write_atomic(out / "summary.csv", _csv(rows))
    write_atomic(out / "report.md", report.write_report(settings, rows, length_rows, flips, runs, written,
                                                                 records))
    return summary


def _mean_load(records: list[dict[str, Any]]) -> float | None:
    loads = [r["load_avg"] for r in records if r.get("load_avg") is not None]
    return round(sum(loads) / len(loads), 2) if loads else None


def _load_avg() -> float | None:
    """The 1-minute load average when a sample finishes: on a shared machine it tells which timings were
    taken while other work competed for the cores."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[c for c in metrics.COLUMNS if c != "length"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
