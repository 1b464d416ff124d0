"""Generate and score one batch of RULER samples under one policy run and one protocol, through ``kvslim.Cache``.

Each sample becomes one flat, JSON-ready record: the RULER score, the protocol, the output, what the
cache held and how long it took (the fields of :mod:`kvslim.bench.execute`'s records where they mean the
same thing). :func:`sample_fields` is what every backend records the same way (the engine's records,
:mod:`.engine`, add their own costs to it), so their answers can be compared sample by sample.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...generate import generate_ids
from ..config import Run
from ..execute import cost_fields, eos_ids
from ..memory import PeakMemory
from ..store import HF
from .protocols import QUERY_AGNOSTIC, feed
from .scoring import METRICS
from .tasks import RulerSample, RulerTask


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's (instruct models often
    end a turn with a token the tokenizer does not call its eos)."""
    ids = eos_ids(tokenizer)
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= {extra} if isinstance(extra, int) else set(extra or [])
    return sorted(ids)


def sample_fields(tokenizer: Any, task: RulerTask, sample: RulerSample, run: Run, spec: str, protocol: str,
                  new_ids: Sequence[int], stops: Sequence[int], backend: str) -> dict[str, Any]:
    """The per-sample record every backend writes: which sample and run, the answer decoded from ``new_ids``
    (stop tokens dropped) and its RULER score."""
    text = tokenizer.decode([t for t in new_ids if t not in stops], skip_special_tokens=True)
    score = METRICS[task.metric](text, sample.answers)
    depths = sample.meta.get("depths") or []
    return {
        "suite": "ruler", "backend": backend, "task": sample.task, "sample_id": sample.id,
        "length": sample.meta["length"], "protocol": protocol, "policy": run.policy, "keep": run.keep,
        "policy_spec": spec, "prompt_tokens": len(sample.prompt_ids), "question_tokens": len(sample.question_ids),
        "depth": depths[0] if len(depths) == 1 else None, "answer": sample.answers, "output": text,
        "metric": task.metric, "score": score, "correct": score >= 1.0, "output_tokens": len(new_ids),
    }


def generate_batch(model: Any, tokenizer: Any, task: RulerTask, samples: Sequence[RulerSample], run: Run,
                   protocol: str, memory: PeakMemory) -> list[dict[str, Any]]:
    fed = [feed(s.context_ids, s.question_ids, protocol) for s in samples]
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0] if stops else 0
    memory.reset()
    suffixes = [suffix for _, suffix in fed if suffix is not None]
    new_ids, cache, timing = generate_ids(
        model, [prompt for prompt, _ in fed], run.build(), task.tokens_to_generate, stops, pad_token_id=pad,
        suffix_ids=suffixes if protocol == QUERY_AGNOSTIC else None)
    peak = memory.read()
    end, full = cache.bytes_per_sequence(), cache.full_bytes_per_sequence()
    host, kept = cache.bytes_per_sequence(host=True), cache.tokens_per_sequence()
    gen_s = timing["ttft_s"] + timing["tpot_s"] * (max(len(ids) for ids in new_ids) - 1)
    records = []
    for i, (sample, ids) in enumerate(zip(samples, new_ids)):
        records.append({
            **sample_fields(tokenizer, task, sample, run, cache.policy.spec, protocol, ids, stops, HF),
            **cost_fields(timing["kv_bytes_prefill"][i], end[i], host[i], full[i], kept[i]),
            "ttft_s": timing["ttft_s"], "tpot_s": timing["tpot_s"], "gen_s": gen_s,
            "tokens_per_s": len(ids) / gen_s if gen_s > 0 else None,
            "peak_mem_bytes": peak, "peak_mem_kind": memory.kind, "batch_size": len(samples),
        })
    return records
