"""merge(SCORER): evicted values fold into the kept token with the most similar key; real bytes are the kept rows."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvslim
from kvslim.cache.layer import LayerKV
from kvslim.engine import LLM, SamplingParams
from kvslim.methods import Observation, merge

PROMPTS = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 71)]


def _prefill(model, ids, policy) -> kvslim.Cache:
    cache = kvslim.Cache(policy, model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


def _observation(keys: torch.Tensor, values: torch.Tensor) -> Observation:
    layer = LayerKV(0)
    layer.append(keys, values)
    layer.state["prompt"] = layer.state["real"] = torch.full((keys.shape[0],), keys.shape[2])
    return Observation(layer, 1, keys, keys.shape[-1] ** -0.5, "prefill")


@pytest.mark.parametrize(("spec", "plain"), [
    ("merge(snapkv(window=8))", "snapkv(window=8)"),
    ("merge(h2o)", "h2o"),
    ("merge(keydiff)", "keydiff"),
    ("merge(adakv(keydiff))", "adakv(keydiff)"),
    ("merge(snapkv(window=8))+kivi4(residual=0,group=16)", "snapkv(window=8)+kivi4(residual=0,group=16)"),
])
def test_real_bytes_are_the_kept_rows(llama, prompt, spec, plain):
    policy = kvslim.policy(spec, keep=0.25)
    cache = _prefill(llama, prompt, policy)
    full = _prefill(llama, prompt, kvslim.policy("full"))
    lengths = torch.stack([layer.lengths for layer in cache.layers])  # (L, B, H)
    if "adakv" not in spec:
        assert (lengths == math.ceil(prompt.shape[1] * 0.25)).all()
    assert cache.nbytes() == policy.expected_bytes(cache.shape, prompt.shape[1]) < full.nbytes()
    assert cache.nbytes() == _prefill(llama, prompt, kvslim.policy(plain, keep=0.25)).nbytes()


def test_keep_one_is_the_full_cache(llama, prompt):
    with torch.no_grad():
        ref = llama(prompt, past_key_values=DynamicCache(config=llama.config), use_cache=True)
        cache = kvslim.Cache(kvslim.policy("merge(snapkv)", keep=1.0), llama.config)
        out = llama(prompt, past_key_values=cache, use_cache=True)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
        ref_cache, token = ref.past_key_values, ref.logits[:, -1:].argmax(-1)
        for _ in range(3):
            ref = llama(token, past_key_values=ref_cache, use_cache=True)
            out = llama(token, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
            token = ref.logits[:, -1:].argmax(-1)


@pytest.mark.parametrize("similarities", [1 << 26, 300])  # at once, and 2 rows of similarities at a time
def test_merged_values_are_the_documented_weighted_means(monkeypatch, similarities):
    """Against a direct loop: each evicted token joins the kept token with the highest key cosine; the kept value
    becomes the softmax(score)-weighted mean of itself and what joined it."""
    monkeypatch.setattr(merge, "_SIMILARITIES", similarities)
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 20, 8, generator=gen), torch.randn(2, 3, 20, 8, generator=gen)
    obs = _observation(keys, values)
    policy = kvslim.policy("merge(keydiff)", budget=6)
    scores = policy.score(obs).float()
    plain = _observation(keys, values)
    kvslim.policy("keydiff", budget=6).on_prefill(plain)
    policy.on_prefill(obs)
    merged_keys, merged, _ = obs.layer.dense(torch.float32)
    plain_keys, plain_values, _ = plain.layer.dense(torch.float32)
    torch.testing.assert_close(merged_keys, plain_keys, rtol=0, atol=0)  # keys: exactly the kept keys
    assert not torch.allclose(merged, plain_values)
    unit = F.normalize(keys, dim=-1)
    for b in range(2):
        for h in range(3):
            kept = [int((keys[b, h] == row).all(-1).nonzero()) for row in plain_keys[b, h]]
            w = torch.softmax(scores[b, h], -1)
            total = {j: w[j] * values[b, h, j] for j in kept}
            weight = {j: w[j] for j in kept}
            for i in set(range(20)) - set(kept):
                j = kept[int((unit[b, h, kept] @ unit[b, h, i]).argmax())]
                total[j] = total[j] + w[i] * values[b, h, i]
                weight[j] = weight[j] + w[i]
            expected = torch.stack([total[j] / weight[j] for j in kept])
            torch.testing.assert_close(merged[b, h], expected, rtol=1e-5, atol=1e-5)


def test_merge_differs_from_its_scorer_only_in_values(llama, prompt):
    plain = _prefill(llama, prompt, kvslim.policy("snapkv(window=8)", keep=0.25))
    merged = _prefill(llama, prompt, kvslim.policy("merge(snapkv(window=8))", keep=0.25))
    changed = False
    for a, b in zip(plain.layers, merged.layers):
        ka, va, ma = a.dense(torch.float32)
        kb, vb, mb = b.dense(torch.float32)
        assert torch.equal(ma, mb) and torch.equal(ka, kb)
        changed |= not torch.equal(va, vb)
    assert changed


def test_specs_and_refusals():
    assert kvslim.policy("merge(snapkv(window=16),keep=0.25)").spec.startswith("merge(snapkv(keep=0.25,")
    assert "window=16" in kvslim.policy("merge(snapkv(window=16),keep=0.25)").spec
    assert kvslim.policy(kvslim.policy("merge(h2o,keep=0.5)").spec).spec == kvslim.policy("merge(h2o,keep=0.5)").spec
    for spec in ("merge(adakv(keydiff),keep=0.3)", "adakv(merge(keydiff),keep=0.3)",
                 "merge(snapkv(window=8),keep=0.3)"):
        assert kvslim.policy(kvslim.policy(spec).spec).spec == kvslim.policy(spec).spec
    assert kvslim.policy("adakv(merge(keydiff),keep=0.3)").spec.startswith("adakv(merge(keydiff(")
    with pytest.raises(ValueError, match="not a token scorer"):
        kvslim.policy("merge(kivi4)")


@pytest.mark.parametrize("spec", [
    "merge(snapkv(keep=0.25,window=4))",
    "merge(snapkv(keep=0.25,window=4))+int8",  # merged at prefill, then packed
    "merge(rkv(budget=32,window=4))",  # merged on every decoding step too, from the engine's pages
    "merge(keydiff(keep=0.25))+kivi4(group=4,residual=8)",  # packed quantized after the merge
    "merge(h2o(keep=0.4,window=2))",  # merged on every step from H2O's accumulated attention (test_compression)
])
@torch.inference_mode()
def test_engine_matches_hf_cache_path(llama, spec):
    llm = LLM(llama, policy=spec, kv_memory=0.01, block_size=4)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        cache = kvslim.Cache(kvslim.policy(spec), llama.config)
        ids, tokens = torch.tensor([prompt]), []
        for _ in range(24):
            tokens.append(int(llama(ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax()))
            ids = torch.tensor([[tokens[-1]]])
        assert out.token_ids == tokens
