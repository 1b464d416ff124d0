"""What one process runs of a RULER run: the samples (:func:`prepare`) and the batches of some policy runs
(:func:`unit_batches`), through the Hugging Face path or the paged engine. The run itself (:mod:`.runner`) and
each of its worker processes (:mod:`.workers`) call the same two functions, so a record does not depend on which
process generated it.

On the Hugging Face path batches hold samples of one task and length, whose prompts are within a haystack unit of
each other, so padding wastes little; every run and protocol measures a batch before the next batch starts. With
``--engine`` a batch is every sample of a run, protocol and length (:mod:`.engine`); what the engine refuses runs
through the Hugging Face path instead, its records marked ``backend="hf"``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from ...models import load_model
from ..config import Run
from ..memory import PeakMemory
from ..store import HF, Key
from .config import RulerConfig
from .engine import ENGINE, Refused, run_batches
from .execute import generate_batch, stop_ids
from .prompt import Framing
from .tasks import RulerSample, RulerTask, get_ruler_task

Loader = Callable[[RulerConfig], tuple[Any, Any]]
Work = list[tuple[RulerTask, int, list[RulerSample]]]


def load(config: RulerConfig) -> tuple[Any, Any]:
    return load_model(config.model, dtype=config.torch_dtype, device=config.device)


@dataclass
class Setup:
    """A loaded model and what is generated from its tokenizer: the prompt format and every task's samples."""

    model: Any
    tokenizer: Any
    chat: bool
    work: Work
    memory: PeakMemory


def prepare(config: RulerConfig, loader: Loader) -> Setup:
    """Load the model and generate every task x length's samples (seeded: every process generates the same)."""
    model, tokenizer = loader(config)
    if tokenizer is None:
        raise ValueError(f"model {config.model!r} comes without a tokenizer; RULER needs a real model's")
    chat = config.chat if config.chat is not None else bool(getattr(tokenizer, "chat_template", None))
    framing = Framing(tokenizer, chat)
    work = [(task, length, task.generate(config.samples, length, framing, config.seed))
            for task in map(get_ruler_task, config.tasks) for length in config.lengths]
    return Setup(model, tokenizer, chat, work, PeakMemory(next(model.parameters()).device))


def unit_batches(setup: Setup, config: RulerConfig, runs: list[Run], done: Callable[[Key], bool], bar: tqdm,
                 refused: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Every batch of ``runs`` not ``done`` yet, as lists of records, through the backend ``config`` names; with
    the engine, each policy run, protocol and length it refuses is noted in ``refused`` (label, protocol, length,
    reason) and runs through the Hugging Face path."""
    if config.engine:
        return _engine_batches(setup, config, runs, done, bar, refused)
    return _hf_batches(setup, config, runs, done, bar)


def _hf_batches(setup: Setup, config: RulerConfig, runs: list[Run], done: Callable[[Key], bool], bar: tqdm,
                protocols: list[str] | None = None, lengths: list[int] | None = None
                ) -> Iterator[list[dict[str, Any]]]:
    """``kvslim.Cache`` batches of ``batch_size`` samples of one task and length (of ``lengths``, default all);
    every run and protocol (of ``protocols``) measures a batch before the next batch starts."""
    for task, length, samples in setup.work:
        if lengths is not None and length not in lengths:
            continue
        for i in range(0, len(samples), config.batch_size):
            for run in runs:
                for protocol in protocols or config.protocols:
                    batch = [s for s in samples[i:i + config.batch_size]
                             if not done((task.name, length, s.id, run.policy, run.keep, protocol, HF))]
                    if batch:
                        bar.set_description(f"{task.name} {length} {run.label} {protocol}")
                        yield generate_batch(setup.model, setup.tokenizer, task, batch, run, protocol, setup.memory)


def _engine_batches(setup: Setup, config: RulerConfig, runs: list[Run], done: Callable[[Key], bool], bar: tqdm,
                    refused: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """One engine batch per run, protocol and length: every task's samples not yet done, submitted at once."""
    stops = stop_ids(setup.model, setup.tokenizer)
    kv_memory: float = config.kv_memory  # type: ignore[assignment]  (RulerConfig.validate requires it with --engine)

    def pending(run: Run, protocol: str, length: int) -> list[tuple[RulerTask, RulerSample]]:
        return [(task, s) for task, at, samples in setup.work if at == length for s in samples
                if not done((task.name, length, s.id, run.policy, run.keep, protocol, ENGINE))]

    for run in runs:
        todo = [(protocol, length, pending(run, protocol, length)) for protocol in config.protocols
                for length in config.lengths]
        todo = [(protocol, length, batch) for protocol, length, batch in todo if batch]
        if not todo:
            continue
        bar.set_description(f"engine {run.label}: {sum(len(b) for _, _, b in todo)} samples, a batch at once")
        for protocol, length, records in run_batches(setup.model, setup.tokenizer, run, todo, stops, kv_memory):
            if isinstance(records, Refused):
                refused.append({"label": run.label, "protocol": protocol, "length": length, "reason": str(records)})
                yield from _hf_batches(setup, config, [run], done, bar, [protocol], [length])
            else:
                yield records
