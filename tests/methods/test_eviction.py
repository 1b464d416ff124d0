"""Every eviction method keeps exactly its budget, physically, and changes nothing at keep = 1."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import kvslim
from kvslim.methods.pyramidkv import pyramid_budgets

BUDGETED = ["random", "streaming", "h2o", "tova", "snapkv", "pyramidkv", "adakv", "knorm"]
SMALL_WINDOW = {"snapkv": 8, "pyramidkv": 8, "adakv": 8, "h2o": 8}


def _policy(name: str, **kw):
    if name in SMALL_WINDOW:
        kw.setdefault("window", SMALL_WINDOW[name])
    return kvslim.policy(name, **kw)


def _prefill(model, ids, policy):
    cache = kvslim.Cache(policy, model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("name", BUDGETED)
def test_prefill_keeps_exactly_the_budget(model, prompt, name):
    cache = _prefill(model, prompt, _policy(name, keep=0.25))
    n, budget = prompt.shape[1], math.ceil(prompt.shape[1] * 0.25)
    lengths = torch.stack([layer.lengths for layer in cache.layers]).float()  # (L, B, H)
    if name == "pyramidkv":
        assert lengths.mean().item() == budget
        expected = pyramid_budgets(budget, n, len(cache.layers), 20.0)
        assert lengths[:, 0, 0].tolist() == expected
    elif name == "adakv":
        assert (lengths.sum(-1) == budget * lengths.shape[-1]).all()  # the layer budget is shared out exactly
    else:
        assert (lengths == budget).all()
    assert cache.nbytes() == sum(layer.nbytes() for layer in cache.layers)


def test_budget_in_tokens_per_head(llama, prompt):
    cache = _prefill(llama, prompt, _policy("snapkv", budget=20))
    assert all((layer.lengths == 20).all() for layer in cache.layers)


@pytest.mark.parametrize("name", ["full", "think", *BUDGETED])
def test_keep_one_changes_nothing(model, prompt, name):
    with torch.no_grad():
        ref = model(prompt, past_key_values=DynamicCache(config=model.config), use_cache=True)
        kw = {} if name == "full" else ({"ratio": 0.0} if name == "think" else {"keep": 1.0})
        cache = kvslim.Cache(_policy(name, **kw), model.config)
        out = model(prompt, past_key_values=cache, use_cache=True)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
        ref_cache, token = ref.past_key_values, ref.logits[:, -1:].argmax(-1)
        for _ in range(4):  # decoding over kvslim storage equals decoding over the full cache
            ref = model(token, past_key_values=ref_cache, use_cache=True)
            out = model(token, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
            token = ref.logits[:, -1:].argmax(-1)


def test_nbytes_shrinks_by_kept_ratio(llama, prompt):
    full = _prefill(llama, prompt, kvslim.policy("full"))
    for keep in (0.5, 0.25, 0.125):
        cache = _prefill(llama, prompt, _policy("snapkv", keep=keep))
        ratio = math.ceil(prompt.shape[1] * keep) / prompt.shape[1]
        assert cache.nbytes() == full.nbytes() * ratio
        assert cache.stats()["bytes_ratio"] == pytest.approx(ratio)


def test_adakv_heads_keep_different_lengths(llama, prompt):
    cache = _prefill(llama, prompt, _policy("adakv", keep=0.25))
    assert any(len(set(layer.lengths[0].tolist())) > 1 for layer in cache.layers)
    assert cache.nbytes() == sum(int(layer.lengths.sum()) for layer in cache.layers) * 2 * 16 * 4


def test_think_stores_fewer_key_channels(llama, prompt):
    full = _prefill(llama, prompt, kvslim.policy("full"))
    cache = _prefill(llama, prompt, kvslim.policy("think", ratio=0.5))
    index_bytes = 2 * 2 * 8 * 2  # layers x kv heads x kept channels x int16
    assert cache.nbytes() == full.nbytes() * 3 // 4 + index_bytes
    assert cache.nbytes() == cache.policy.expected_bytes(cache.shape, prompt.shape[1]) 


@pytest.mark.parametrize("prune_decoded", [True, False])
def test_think_keeps_decoded_keys_thin_unless_told(llama, prompt, prune_decoded):
    """By default each decoded key attends whole at its own step, then keeps the prompt's channels (what the paged
    engine stores); prune_decoded=false keeps decoded keys whole, as the authors' code does."""
    spec = f"think(ratio=0.5,prune_decoded={str(prune_decoded).lower()})"
    cache = _prefill(llama, prompt, kvslim.policy(spec))
    prefilled, steps = cache.nbytes(), 5
    ids = prompt[:, -1:]
    with torch.no_grad():
        for _ in range(steps):
            ids = llama(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    key_channels = 8 if prune_decoded else 16  # of 16, per token, layer and KV head
    assert cache.nbytes() - prefilled == steps * 2 * 2 * (key_channels + 16) * 4
    assert all(layer.lengths.eq(prompt.shape[1] + steps).all() for layer in cache.layers)
    if prune_decoded:  # every key thin: what the calculator counts
        assert cache.nbytes() == cache.policy.expected_bytes(cache.shape, prompt.shape[1] + steps)


@pytest.mark.parametrize("name", BUDGETED)
def test_calculator_matches_what_is_held(llama, prompt, name):
    policy = _policy(name, keep=0.25)
    cache = _prefill(llama, prompt, policy)
    assert cache.nbytes() == policy.expected_bytes(cache.shape, prompt.shape[1])
