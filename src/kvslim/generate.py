"""``kvslim.generate``: a batch of prompts of different lengths through a compressed cache, with per-sequence stats.

A direct loop (prefill, then one token at a time) rather than ``model.generate``, so that time to
first token, time per output token and the bytes held after prefill are measured where they happen.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from .cache import Cache
from .hf_compat import cache_arg
from .methods import Method, policy as build_policy
from .methods.kvzip import RepeatPrompt, reconstruct, repeat_prompt


@dataclass
class Generation:
    """One sequence's output and what its cache cost."""

    text: str
    prompt_tokens: int
    new_tokens: int
    token_ids: list[int] = field(repr=False)
    kv_bytes_prefill: int
    kv_bytes_end: int
    kv_host_bytes_end: int  # of kv_bytes_end, what sits in host memory (offloading methods); the rest is on the device
    full_bytes_end: int
    kept_tokens_end: int
    ttft_s: float
    tpot_s: float
    policy: str

    @property
    def compression(self) -> float:
        """Full-cache bytes over bytes held at the end (higher is smaller)."""
        return self.full_bytes_end / self.kv_bytes_end if self.kv_bytes_end else float("inf")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("token_ids")
        out["compression"] = self.compression
        return out


def _sample(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _encode(tokenizer: Any, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    if chat:
        return [
            list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
            for p in prompts
        ]
    return [tokenizer.encode(p) for p in prompts]


@torch.inference_mode()
def generate_ids(model: Any, prompt_ids: Sequence[Sequence[int]], policy: "str | Method" = "full",
                 max_new_tokens: int = 32, eos_token_id: int | Sequence[int] | None = None,
                 temperature: float = 0.0, seed: int = 0, pad_token_id: int = 0, repeat: RepeatPrompt | None = None,
                 suffix_ids: Sequence[Sequence[int]] | None = None,
                 **policy_params: Any) -> tuple[list[list[int]], Cache, dict[str, Any]]:
    """Generate from token ids; returns new ids per sequence, the cache, and timing/bytes measurements.

    A probing policy (``kvzip``) runs its reconstruction pass right after the prefill, with ``repeat`` (its
    instructions in the model's tokens, :func:`kvslim.methods.kvzip.repeat_prompt`) before each chunk; its time
    counts in ``ttft_s``.

    ``suffix_ids`` (one non-empty list per prompt) are fed after the prompt has been prefilled and
    compressed, through :meth:`Cache.appended`: attended in full, kept as they are, and the answer is
    generated after them. That is the query-agnostic protocol (the prompt is the context, the suffix the
    question); without it the whole prompt is compressed together (query-aware). ``ttft_s`` covers every
    forward and ``kv_bytes_prefill`` is measured after the suffix.

    ``peak_tokens_per_head``: per sequence, the most tokens any layer and KV head held between forwards, prefill
    included: what a decode-time budget must bound however long the output (a long generation's cache, measured
    as it runs rather than only at the end).
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    if suffix_ids is not None and (len(suffix_ids) != len(prompt_ids) or any(len(s) == 0 for s in suffix_ids)):
        raise ValueError("suffix_ids needs one non-empty list of token ids per prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    method = build_policy(policy, **policy_params)
    device = next(model.parameters()).device
    cache = Cache(method, model.config)
    longest = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):  # left padding: every prompt ends at the last column
        ids[i, longest - len(p):] = torch.tensor(list(p))
        mask[i, longest - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None

    start = time.perf_counter()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_arg(cache),
                   use_cache=True, logits_to_keep=1).logits[:, -1]  # only the last position's logits
    if method.probes:
        reconstruct(model, cache, ids, mask, repeat)
    if suffix_ids is not None:
        logits, positions = _append(model, cache, suffix_ids, positions[:, -1:] + 1, pad_token_id)
    token = _sample(logits, temperature, generator)
    peak = _held(cache)
    _sync(device)
    ttft = time.perf_counter() - start
    prefill_bytes = cache.bytes_per_sequence()

    out: list[list[int]] = [[int(t)] for t in token.tolist()]
    done = [int(t) in eos for t in token.tolist()]
    next_pos = positions[:, -1:] + 1
    decode_start = time.perf_counter()
    steps = 0
    while not all(done) and steps < max_new_tokens - 1:
        out_step = model(input_ids=token[:, None], position_ids=next_pos, **cache_arg(cache), use_cache=True)
        logits = out_step.logits[:, -1]
        token = _sample(logits, temperature, generator)
        peak = torch.maximum(peak, _held(cache))
        next_pos = next_pos + 1
        steps += 1
        for i, t in enumerate(token.tolist()):
            if not done[i]:
                out[i].append(int(t))
                done[i] = int(t) in eos
    _sync(device)
    tpot = (time.perf_counter() - decode_start) / steps if steps else 0.0
    return out, cache, {"ttft_s": ttft, "tpot_s": tpot, "kv_bytes_prefill": prefill_bytes,
                        "peak_tokens_per_head": peak.tolist()}


def _held(cache: Cache) -> Tensor:
    """(B,) the most tokens any layer and KV head of each sequence holds now (on the device: no sync)."""
    return torch.stack([layer.lengths.amax(-1) for layer in cache.layers if layer.segments]).amax(0)


def _append(model: Any, cache: Cache, suffix_ids: Sequence[Sequence[int]], start: Tensor,
            pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Feed the suffixes uncompressed after each sequence's prompt (left-padded to one width); returns the
    last position's logits and the suffix positions (the last column continues each sequence)."""
    longest = max(len(s) for s in suffix_ids)
    ids = torch.full((len(suffix_ids), longest), pad_token_id, dtype=torch.long)
    real = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(suffix_ids):
        ids[i, longest - len(s):] = torch.tensor(list(s))
        real[i, longest - len(s):] = True
    ids, real = ids.to(start.device), real.to(start.device)
    positions = start + (real.long().cumsum(-1) - 1).clamp(min=0)
    with cache.appended(real):
        logits = model(input_ids=ids, position_ids=positions, **cache_arg(cache), use_cache=True,
                       logits_to_keep=1).logits[:, -1]
    return logits, positions


def generate(model: Any, tokenizer: Any, prompts: str | Sequence[str], policy: "str | Method" = "full",
             max_new_tokens: int = 32, chat: bool = False, temperature: float = 0.0, seed: int = 0,
             **policy_params: Any) -> list[Generation]:
    """Generate for a batch of prompts of any lengths with a compressed cache; one :class:`Generation` each.

    ``chat=True`` wraps each prompt in the tokenizer's chat template (for instruct models).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompt_ids = _encode(tokenizer, prompts, chat)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if isinstance(eos, int) else 0)
    method = build_policy(policy, **policy_params)
    repeat = repeat_prompt(tokenizer) if method.probes else None
    new_ids, cache, timing = generate_ids(model, prompt_ids, method, max_new_tokens, eos, temperature, seed, pad, repeat)
    end_bytes, kept, full = cache.bytes_per_sequence(), cache.tokens_per_sequence(), cache.full_bytes_per_sequence()
    host_bytes = cache.bytes_per_sequence(host=True)
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    results = []
    for i, ids in enumerate(new_ids):
        text_ids = [t for t in ids if t not in eos_ids]
        results.append(Generation(
            text=tokenizer.decode(text_ids, skip_special_tokens=True), prompt_tokens=len(prompt_ids[i]),
            new_tokens=len(ids), token_ids=ids, kv_bytes_prefill=timing["kv_bytes_prefill"][i],
            kv_bytes_end=end_bytes[i], kv_host_bytes_end=host_bytes[i], full_bytes_end=full[i], kept_tokens_end=kept[i],
            ttft_s=timing["ttft_s"], tpot_s=timing["tpot_s"], policy=cache.policy.spec,
        ))
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
