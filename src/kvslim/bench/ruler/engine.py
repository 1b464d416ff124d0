"""RULER through the paged engine (``kvslim bench --suite ruler --engine --kv-memory G``): every prompt of one
policy run, protocol and length submitted at once to an :class:`~kvslim.engine.LLMEngine` with a fixed KV pool,
run with continuous batching, and scored as the ``kvslim.Cache`` path scores them.

What it adds to quality: what a method buys in serving, at the same KV memory: the most sequences the pool
ran at once, output tokens per second over the whole batch (prefill included), time to first token from
submission (queueing included, since everything is submitted at once) and preemptions. Each batch gets a
fresh engine, so no prefix cached by an earlier batch (another protocol feeds full's same prompt) flatters it.

Under query-agnostic the question is the request's *suffix*: the context is prefilled and compressed, then
the question is prefilled uncompressed after what was kept (:meth:`LLMEngine.add_request`), as
``kvslim.Cache.appended`` does on the Hugging Face path. A policy the engine refuses (a storage format under
a suffix, ThinK's pruned channels...) is skipped with its one-line reason.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Iterator, Sequence
from itertools import count
from typing import Any

import torch

from ...engine import LLMEngine, RequestTooLarge, SamplingParams
from ..config import Run
from .execute import sample_fields
from .protocols import feed
from .tasks import RulerSample, RulerTask

ENGINE = "engine"
_batches = count()


class Refused(Exception):
    """The engine cannot run this policy (or this protocol with it); the message says why, in one line."""


Batch = tuple[str, int, Sequence[tuple[RulerTask, RulerSample]]]  # protocol, length, samples


def run_batches(model: Any, tokenizer: Any, run: Run, batches: Sequence[Batch], stops: Sequence[int],
                kv_memory: float) -> Iterator[tuple[str, int, "list[dict[str, Any]] | Refused"]]:
    """Each batch's records (or why the engine refused it) through one engine for ``run`` with a ``kv_memory``
    GiB pool: its decode graphs are captured before anything is timed, and it is freed (pool and graphs) before
    the generator ends, so the next run's engine can allocate its own."""
    try:
        engine = LLMEngine(model, tokenizer, policy=run.build(), kv_memory=kv_memory)
    except ValueError as err:
        for protocol, length, _ in batches:
            yield protocol, length, Refused(str(err))
        return
    try:
        engine.capture_graphs()
        for protocol, length, work in batches:
            try:
                records: "list[dict[str, Any]] | Refused" = engine_batch(engine, tokenizer, work, run, protocol, stops,
                                                                         kv_memory)
            except Refused as err:
                records = err
            yield protocol, length, records
    finally:
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def engine_batch(engine: LLMEngine, tokenizer: Any, work: Sequence[tuple[RulerTask, RulerSample]], run: Run,
                 protocol: str, stops: Sequence[int], kv_memory: float) -> list[dict[str, Any]]:
    """Submit every sample at once, run the engine until all are answered; one record per sample. The engine
    forgets earlier batches' prefixes first (another protocol feeds full's same prompts).

    Raises :class:`Refused` when the engine refuses the requests (a suffix with a storage format), and
    ``RequestTooLarge`` when a prompt cannot fit the pool even alone (raise ``kv_memory``).
    """
    engine.reset_prefix_cache()
    started = time.perf_counter()
    requests: dict[str, tuple[RulerTask, RulerSample]] = {}
    try:
        for task, sample in work:
            prompt, suffix = feed(sample.context_ids, sample.question_ids, protocol)
            params = SamplingParams(max_tokens=task.tokens_to_generate, stop_token_ids=list(stops))
            requests[engine.add_request(prompt, params, suffix=suffix)] = (task, sample)
    except RequestTooLarge as err:
        raise RequestTooLarge(f"{err} (RULER --engine: raise --kv-memory)") from None
    except ValueError as err:
        for request_id in requests:
            engine.abort(request_id)
            engine.finished.pop(request_id, None)
        raise Refused(str(err)) from None
    preempted, most = engine.scheduler.preemptions, 0
    while engine.has_unfinished:
        engine.step()
        most = max(most, engine.metrics().running)
    wall = time.perf_counter() - started
    outputs = {request_id: engine.finished.pop(request_id) for request_id in requests}
    produced = sum(out.stats["completion_tokens"] for out in outputs.values())
    batch = {"engine_batch": f"{time.time():.0f}-{next(_batches)}", "engine_requests": len(requests),
             "engine_wall_s": wall, "engine_output_tokens": produced, "engine_max_running": most,
             "engine_preemptions": engine.scheduler.preemptions - preempted, "kv_memory_gib": kv_memory}
    records = []
    for request_id, (task, sample) in requests.items():
        out = outputs[request_id]
        stats = out.stats
        record = sample_fields(tokenizer, task, sample, run, engine.policy.spec, protocol, out.token_ids, stops, ENGINE)
        peak, full = stats["peak_kv_bytes"], stats["full_kv_bytes"]
        records.append({
            **record, "output_tokens": stats["completion_tokens"],  # the stop token too, as the HF path counts
            "kv_bytes_prefill": peak, "kv_bytes_peak": peak, "full_bytes": full,
            "compression": full / peak if peak else None,
            "ttft_s": stats["ttft_s"], "tpot_s": stats["tpot_s"], "gen_s": stats["latency_s"],
            "tokens_per_s": stats["completion_tokens"] / stats["latency_s"] if stats["latency_s"] else None,
            "preemptions": stats["preemptions"], "cached_prompt_tokens": stats["cached_prompt_tokens"], **batch,
        })
    return records
