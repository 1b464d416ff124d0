"""Measure samples under one policy run: generation tasks through ``generate_ids``, perplexity by a
teacher-forced loop through the compressed cache (:data:`PERPLEXITY_PROTOCOL`). Each function returns one
flat, JSON-ready record per sample.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..cache import Cache
from ..generate import generate_ids
from ..hf_compat import cache_arg
from ..methods.kvzip import repeat_prompt
from .config import BenchConfig, Run
from .memory import PeakMemory
from .tasks import Sample, Task

PERPLEXITY_PROTOCOL = (
    "the sample's text is tokenized; its last c = min(ppl_tokens, n/2) tokens are the continuation and "
    "everything before is the prompt. The prompt is prefilled through a `kvslim.Cache` (the policy compresses "
    "it), then the continuation is fed one token at a time through that cache, so decode-time policies act at "
    "every step as in generation. Perplexity is exp of the mean negative log-likelihood of the c continuation "
    "tokens (pooled over samples: exp of total NLL over total scored tokens)."
)


def encode(tokenizer: Any, sample: Sample, chat: bool) -> list[int]:
    """Prompt ids: the plain prompt, or the chat template around the question with the answer prefix
    already started in the assistant turn (so both formats ask for the same short completion)."""
    if not chat:
        return list(tokenizer.encode(sample.prompt))
    m = sample.meta
    user = f"{m['instruction']}\n\n{m['context']}\n\n{m['question']}"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return list(ids) + list(tokenizer.encode(m["answer_prefix"], add_special_tokens=False))


def _common(sample: Sample, run: Run, spec: str, prompt_tokens: int) -> dict[str, Any]:
    depth = sample.meta.get("depth")
    return {
        "task": sample.task, "sample_id": sample.id, "length": sample.meta["length"], "policy": run.policy,
        "keep": run.keep, "policy_spec": spec, "prompt_tokens": prompt_tokens,
        "depth": depth if isinstance(depth, (int, float)) else None,
    }


def eos_ids(tokenizer: Any) -> set[int]:
    eos = tokenizer.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or [])


def generate_batch(model: Any, tokenizer: Any, task: Task, samples: Sequence[Sample], run: Run,
                   config: BenchConfig, memory: PeakMemory) -> list[dict[str, Any]]:
    """Generate answers for a batch of samples under one policy run and score them."""
    prompts = [encode(tokenizer, s, config.chat) for s in samples]
    eos = eos_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    memory.reset()
    method = run.build()
    repeat = repeat_prompt(tokenizer) if method.probes else None  # KVzip's instructions
    max_new = max(task.new_tokens(s) for s in samples)
    new_ids, cache, timing = generate_ids(model, prompts, method, max_new, sorted(eos),
                                          pad_token_id=pad, repeat=repeat)
    peak = memory.read()
    end_bytes, full_bytes = cache.bytes_per_sequence(), cache.full_bytes_per_sequence()
    host_bytes, kept = cache.bytes_per_sequence(host=True), cache.tokens_per_sequence()
    steps = max(len(ids) for ids in new_ids) - 1
    gen_s = timing["ttft_s"] + timing["tpot_s"] * steps  # the batch's wall time, shared by its sequences
    records = []
    for i, (sample, ids) in enumerate(zip(samples, new_ids)):
        text = tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)
        score = task.score(sample, text)
        records.append({
            **_common(sample, run, cache.policy.spec, len(prompts[i])),
            "answer": sample.answer, "output": text, "score": score, "correct": score >= 1.0,
            "output_tokens": len(ids), "perplexity": None, "scored_tokens": None, "nll_sum": None,
            **cost_fields(timing["kv_bytes_prefill"][i], end_bytes[i], host_bytes[i], full_bytes[i], kept[i]),
            "peak_tokens_per_head": timing["peak_tokens_per_head"][i],
            "ttft_s": timing["ttft_s"], "tpot_s": timing["tpot_s"], "gen_s": gen_s,
            "tokens_per_s": len(ids) / gen_s if gen_s > 0 else None,
            "peak_mem_bytes": peak, "peak_mem_kind": memory.kind, "batch_size": len(samples),
        })
    return records


def cost_fields(prefill: int, end: int, host: int, full: int, kept: int) -> dict[str, Any]:
    """KV bytes: all held (``kv_bytes_*``), and of those at the end, the device's and host memory's shares."""
    return {"kv_bytes_prefill": prefill, "kv_bytes_end": end, "kv_device_bytes_end": end - host,
            "kv_host_bytes_end": host, "full_bytes": full, "kept_tokens_end": kept,
            "compression": full / end if end else None}


@torch.inference_mode()
def perplexity_sample(model: Any, tokenizer: Any, sample: Sample, run: Run, config: BenchConfig,
                      memory: PeakMemory) -> dict[str, Any]:
    """Perplexity of the sample's continuation under the compressed cache (see :data:`PERPLEXITY_PROTOCOL`)."""
    ids = list(tokenizer.encode(sample.prompt))
    n_cont = min(config.ppl_tokens, len(ids) // 2)
    if n_cont < 1:
        raise ValueError(f"perplexity sample {sample.id} has {len(ids)} tokens: too short to score")
    device = next(model.parameters()).device
    prefix = torch.tensor([ids[:-n_cont]], device=device)
    cont = ids[-n_cont:]
    cache = Cache(run.build(), model.config)
    memory.reset()
    start = time.perf_counter()
    logits = model(input_ids=prefix, **cache_arg(cache), use_cache=True, logits_to_keep=1).logits[0, -1]
    nll = -torch.log_softmax(logits.float(), -1)[cont[0]]
    _sync(device)
    ttft = time.perf_counter() - start
    prefill_bytes = cache.bytes_per_sequence()[0]
    decode_start = time.perf_counter()
    for i in range(n_cont - 1):
        position = torch.tensor([[prefix.shape[1] + i]], device=device)
        step = torch.tensor([[cont[i]]], device=device)
        logits = model(input_ids=step, position_ids=position, **cache_arg(cache), use_cache=True).logits[0, -1]
        nll = nll - torch.log_softmax(logits.float(), -1)[cont[i + 1]]
    _sync(device)
    decode_s = time.perf_counter() - decode_start
    peak = memory.read()
    tpot = decode_s / (n_cont - 1) if n_cont > 1 else 0.0
    mean_nll = float(nll) / n_cont
    return {
        **_common(sample, run, cache.policy.spec, prefix.shape[1]),
        "answer": None, "output": None, "score": None, "correct": None, "output_tokens": n_cont,
        "perplexity": math.exp(mean_nll), "scored_tokens": n_cont, "nll_sum": float(nll),
        **cost_fields(prefill_bytes, cache.bytes_per_sequence()[0], cache.bytes_per_sequence(host=True)[0],
                cache.full_bytes_per_sequence()[0], cache.tokens_per_sequence()[0]),
        "peak_tokens_per_head": None,  # tracked while generating; here the continuation is fed, not generated
        "ttft_s": ttft, "tpot_s": tpot, "gen_s": ttft + decode_s, "tokens_per_s": n_cont / (ttft + decode_s),
        "peak_mem_bytes": peak, "peak_mem_kind": memory.kind, "batch_size": 1,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
