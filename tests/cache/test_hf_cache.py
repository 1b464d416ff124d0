"""The Hugging Face cache adapter: true positions after eviction, exact streaming windows, batches, errors."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvslim
from kvslim.models import tiny_model


def _full_keys(model, ids):
    """Keys of every layer for every position, from a plain full-cache run."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return [layer.keys for layer in cache.layers]


def test_streaming_keeps_exactly_sinks_and_window_step_after_step(llama):
    ids = torch.randint(1, 256, (1, 120), generator=torch.Generator().manual_seed(3))
    sinks, budget, prompt = 4, 24, 40
    cache = kvslim.Cache(kvslim.policy("streaming", budget=budget, sinks=sinks), llama.config)
    with torch.no_grad():
        llama(ids[:, :prompt], past_key_values=cache, use_cache=True)
        for t in range(prompt, ids.shape[1]):
            if t > prompt:
                llama(ids[:, t - 1 : t], past_key_values=cache, use_cache=True)
            seen = cache.get_seq_length()
            full = _full_keys(llama, ids[:, :seen])
            expected = list(range(sinks)) + list(range(seen - (budget - sinks), seen))
            for layer in cache.layers:
                assert (layer.lengths == budget).all()
            # layer 0's keys depend only on token and position, so they identify which tokens are held
            held, _, valid = cache.layers[0].dense(torch.float32)
            assert valid.all()
            torch.testing.assert_close(held, full[0][:, :, expected], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["snapkv", "h2o", "streaming", "adakv"])
def test_decoding_64_steps_after_compression_uses_true_positions(llama, name):
    """Copy what kvslim kept into a DynamicCache and decode it with explicit true positions: same logits."""
    ids = torch.randint(1, 256, (1, 80), generator=torch.Generator().manual_seed(4))
    cache = kvslim.Cache(kvslim.policy(name, keep=0.5, **({"window": 8} if name != "streaming" else {})), llama.config)
    with torch.no_grad():
        token = llama(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for step in range(64):
            pos = ids.shape[1] + step
            ref_cache = DynamicCache(config=llama.config)
            for i, layer in enumerate(cache.layers):
                keys, values, _ = layer.dense(torch.float32)
                ref_cache.update(keys, values, i)
            out = llama(token, past_key_values=cache, use_cache=True)  # no positions given: the cache's count
            if name != "adakv":  # a DynamicCache cannot hold ragged heads; adakv is checked by its own tests
                ref = llama(token, position_ids=torch.tensor([[pos]]), past_key_values=ref_cache, use_cache=True)
                torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
            assert cache.get_seq_length() == pos + 1
            token = out.logits[:, -1:].argmax(-1)


def test_generate_and_hand_loop_agree(llama):
    ids = torch.randint(1, 256, (1, 64), generator=torch.Generator().manual_seed(5))
    policy = kvslim.policy("snapkv", keep=0.25, window=8)
    out = llama.generate(ids, max_new_tokens=16, do_sample=False, past_key_values=kvslim.Cache(policy, llama.config))
    cache = kvslim.Cache(policy, llama.config)
    tokens, token = [], None
    with torch.no_grad():
        logits = llama(ids, past_key_values=cache, use_cache=True).logits
        for _ in range(16):
            token = logits[:, -1:].argmax(-1)
            tokens.append(int(token))
            logits = llama(token, past_key_values=cache, use_cache=True).logits
    assert out[0, 64:].tolist() == tokens


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["full", "snapkv", "h2o", "adakv"])
def test_batch_of_different_lengths_matches_one_by_one(impl, name):
    model = tiny_model("llama", "gqa", seed=0, attn_implementation=impl)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, 256, (n,), generator=gen).tolist() for n in (50, 31, 64)]
    kw = {} if name == "full" else {"keep": 0.5, "window": 8}
    batch, _, _ = kvslim.generate_ids(model, prompts, name, max_new_tokens=12, **kw)
    for p, got in zip(prompts, batch):
        single, _, _ = kvslim.generate_ids(model, [p], name, max_new_tokens=12, **kw)
        assert got == single[0]


def test_batch_stats_are_per_sequence(llama):
    prompts = [list(range(1, 41)), list(range(1, 81))]
    _, cache, timing = kvslim.generate_ids(llama, prompts, "snapkv", max_new_tokens=4, keep=0.25, window=8)
    assert cache.tokens_seen() == [43, 83]  # prompt + 3 fed-back tokens
    assert cache.tokens_per_sequence() == [2 * 2 * (10 + 3), 2 * 2 * (20 + 3)]  # layers x heads x kept
    assert timing["kv_bytes_prefill"] == [2 * 2 * 10 * 2 * 16 * 4, 2 * 2 * 20 * 2 * 16 * 4]


def test_model_config_must_be_the_models_own(llama):
    import copy

    cache = kvslim.Cache(kvslim.policy("snapkv", keep=0.5), copy.deepcopy(llama.config))
    llama.config._attn_implementation = "sdpa"  # the model was never routed
    with pytest.raises(RuntimeError, match="kvslim.Cache\\(policy, model.config\\)"):
        with torch.no_grad():
            llama(torch.ones(1, 8, dtype=torch.long), past_key_values=cache, use_cache=True)


def test_unsupported_attention_is_refused():
    model = tiny_model("llama", "gqa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="sdpa"):
        kvslim.Cache(kvslim.policy("full"), model.config)


def test_beam_search_is_refused(llama):
    cache = kvslim.Cache(kvslim.policy("full"), llama.config)
    with pytest.raises(ValueError, match="num_beams=1"):
        llama.generate(torch.ones(1, 8, dtype=torch.long), num_beams=2, max_new_tokens=3, past_key_values=cache)
