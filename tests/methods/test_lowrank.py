"""lowrank(rank=R): per-head prefill bases, rank-R coefficients stored; exact at rank=head_dim, bytes by formula."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import kvslim
from kvslim.engine import LLM
from kvslim.methods.lowrank import LowRankSegment


def _prefill(model, ids, policy) -> kvslim.Cache:
    cache = kvslim.Cache(policy, model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


def test_full_rank_is_the_full_cache(model, prompt):
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else \
        model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        ref = model(prompt, past_key_values=DynamicCache(config=model.config), use_cache=True)
        cache = kvslim.Cache(kvslim.policy(f"lowrank(rank={head_dim})"), model.config)
        out = model(prompt, past_key_values=cache, use_cache=True)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
        ref_cache, token = ref.past_key_values, ref.logits[:, -1:].argmax(-1)
        for _ in range(3):  # decoded tokens are projected onto the (complete) prefill basis
            ref = model(token, past_key_values=ref_cache, use_cache=True)
            out = model(token, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
            token = ref.logits[:, -1:].argmax(-1)
    assert all(isinstance(s, LowRankSegment) for layer in cache.layers for s in layer.segments)
    assert max(max(e.values()) for e in cache.stats()["reconstruction_error"]) < 1e-5


@pytest.mark.parametrize("spec", ["lowrank(rank=4)", "snapkv(window=8,keep=0.25)+lowrank(rank=4)"])
def test_bytes_are_coefficients_and_bases(llama, prompt, spec):
    policy = kvslim.policy(spec)
    cache = _prefill(llama, prompt, policy)
    shape, rank = cache.shape, 4
    tokens = prompt.shape[1] if "keep" not in spec else math.ceil(prompt.shape[1] * 0.25)
    per_layer = shape.num_kv_heads * (tokens * 2 * rank + 2 * shape.head_dim * rank) * shape.element_bytes
    assert cache.nbytes() == shape.num_layers * per_layer == policy.expected_bytes(shape, prompt.shape[1])
    assert cache.nbytes() < _prefill(llama, prompt, kvslim.policy("full")).nbytes()
    with torch.no_grad():  # a decoded token adds 2 x rank coefficients per head
        llama(prompt[:, -1:], past_key_values=cache, use_cache=True)
    assert cache.nbytes() == shape.num_layers * (per_layer + shape.num_kv_heads * 2 * rank * shape.element_bytes)


def test_error_decreases_with_rank(llama, prompt):
    errors = []
    for rank in (1, 2, 4, 8):
        stats = _prefill(llama, prompt, kvslim.policy(f"lowrank(rank={rank})")).stats()["reconstruction_error"]
        errors.append(sum(e["keys"] + e["values"] for e in stats))
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_refusals(llama, prompt):
    with pytest.raises(ValueError, match="at most head_dim"):
        _prefill(llama, prompt, kvslim.policy("lowrank(rank=4096)"))
    with pytest.raises(ValueError, match="positive"):
        kvslim.policy("lowrank(rank=0)")
    with pytest.raises(ValueError, match="comes last"):
        kvslim.policy("lowrank(rank=4)+kivi4")
    with pytest.raises(ValueError, match="use kvslim.Cache for lowrank"):
        LLM(llama, policy="snapkv(keep=0.25)+lowrank(rank=4)", kv_memory=0.01)
