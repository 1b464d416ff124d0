"""The frontier scorers (expected_attention, keydiff, lagkv, rkv), adakv around any scorer, and decode-time budgets."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvslim
from kvslim.cache.layer import LayerKV
from kvslim.methods import Observation

SPECS = [
    "keydiff",
    "lagkv(lag=8)",
    "expected_attention(history=32,future=64)",
    "rkv(window=8)",
    "adakv(expected_attention(history=32))",
    "adakv(keydiff)",
    "adakv(lagkv(lag=8))",
]


def _prefill(model, ids, policy) -> kvslim.Cache:
    cache = kvslim.Cache(policy, model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


def _observation(keys: torch.Tensor, values: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                 rope: torch.Tensor | None = None) -> Observation:
    """A one-layer observation over keys (B,H,T,D), as a backend builds it after a prefill."""
    layer = LayerKV(0)
    layer.append(keys, keys if values is None else values)
    layer.state["prompt"] = layer.state["real"] = torch.full((keys.shape[0],), keys.shape[2])
    queries = keys if queries is None else queries
    return Observation(layer, 1, queries, keys.shape[-1] ** -0.5, "prefill", rope=rope)


@pytest.mark.parametrize("spec", SPECS)
def test_prefill_drops_tokens_to_the_budget(llama, prompt, spec):
    full = _prefill(llama, prompt, kvslim.policy("full"))
    policy = kvslim.policy(spec, keep=0.25)
    cache = _prefill(llama, prompt, policy)
    budget = math.ceil(prompt.shape[1] * 0.25)
    lengths = torch.stack([layer.lengths for layer in cache.layers])  # (L, B, H)
    if spec.startswith("adakv"):
        assert (lengths.sum(-1) == budget * lengths.shape[-1]).all()  # the layer budget, shared out by the scorer
    else:
        assert (lengths == budget).all()
    assert cache.nbytes() == policy.expected_bytes(cache.shape, prompt.shape[1]) < full.nbytes()


@pytest.mark.parametrize("spec", SPECS)
def test_keep_one_changes_nothing(model, prompt, spec):
    with torch.no_grad():
        ref = model(prompt, past_key_values=DynamicCache(config=model.config), use_cache=True)
        cache = kvslim.Cache(kvslim.policy(spec, keep=1.0), model.config)
        out = model(prompt, past_key_values=cache, use_cache=True)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
        ref_cache, token = ref.past_key_values, ref.logits[:, -1:].argmax(-1)
        for _ in range(3):
            ref = model(token, past_key_values=ref_cache, use_cache=True)
            out = model(token, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
            token = ref.logits[:, -1:].argmax(-1)


def test_hybrid_with_a_quantizer_stores_fewer_bytes(llama, prompt):
    evicted = _prefill(llama, prompt, kvslim.policy("expected_attention(history=32)", keep=0.5))
    packed = _prefill(llama, prompt, kvslim.policy("expected_attention(history=32)+kivi4(residual=0,group=16)", keep=0.5))
    ada = _prefill(llama, prompt, kvslim.policy("adakv(expected_attention(history=32))+int8", keep=0.5))
    assert packed.stats()["kept_ratio"] == evicted.stats()["kept_ratio"] == ada.stats()["kept_ratio"] == 0.5
    assert packed.nbytes() < evicted.nbytes() / 2 and ada.nbytes() < evicted.nbytes() / 2


def test_keydiff_keeps_the_keys_least_like_the_mean():
    keys = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(0))
    obs = _observation(keys)
    kvslim.policy("keydiff", budget=10).on_prefill(obs)
    anchor = F.normalize(F.normalize(keys, dim=-1).mean(2, keepdim=True), dim=-1)
    similarity = (F.normalize(keys, dim=-1) * anchor).sum(-1)
    expected = similarity.topk(10, dim=-1, largest=False).indices.sort(-1).values
    kept_keys = obs.layer.dense(torch.float32)[0]
    torch.testing.assert_close(kept_keys, keys.gather(2, expected[..., None].expand(-1, -1, -1, 16)))


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RoPE by ``angles`` (..., D/2) in the half-split layout, through complex numbers (an independent route)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), -1)


def test_expected_attention_of_a_fixed_query_is_its_softmax_averaged_over_future_positions():
    """Queries that are one query seen at consecutive positions have zero covariance: the score reduces to the
    mean-query estimate, the softmax of the future-averaged rotated query against the non-sink keys, times |v|."""
    gen = torch.Generator().manual_seed(0)
    dim, n, future = 16, 12, 20
    rope = 1.0 / (100 ** (torch.arange(0, dim, 2).float() / dim))
    base = torch.randn(1, 2, 1, dim, generator=gen)  # one un-rotated query per query head (MHA: 2 KV heads)
    position = torch.arange(30, 30 + n).float()[:, None]
    queries = _rotate(base.expand(-1, -1, n, -1), position * rope)
    keys, values = torch.randn(1, 2, 30, dim, generator=gen), torch.randn(1, 2, 30, dim, generator=gen)
    with_cov = kvslim.policy(f"expected_attention(history={n},future={future},epsilon=0)", keep=0.5)
    without = kvslim.policy(f"expected_attention(history={n},future={future},covariance=False,epsilon=0)", keep=0.5)
    score = with_cov.score(_observation(keys, values, queries, rope))
    torch.testing.assert_close(score, without.score(_observation(keys, values, queries, rope)), rtol=1e-4, atol=1e-7)
    last = position[-1]
    mean = torch.stack([_rotate(base, (last + d) * rope) for d in range(1, future + 1)]).mean(0)  # (1, 2, 1, D)
    expected = ((mean @ keys[:, :, 4:].transpose(-1, -2))[:, :, 0] * dim**-0.5).softmax(-1) * values[:, :, 4:].norm(dim=-1)
    torch.testing.assert_close(score[:, :, 4:], expected, rtol=1e-4, atol=1e-7)
    assert (score[:, :, :4] == 0).all()  # the sinks are out of the softmax (kept by protected())


def _kvpress_expected_attention(pre_rope: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rope: torch.Tensor,
                                sinks: int, future: int) -> torch.Tensor:
    """kvpress 0.5.5's ExpectedAttentionPress.score, restated: statistics of the queries *before* RoPE (B,Hq,T,D)
    after the sinks, the rotation averaged over the absolute positions T..T+future-1, a softmax over the non-sink
    keys per query head, the group mean, times |v|. Returns the non-sink tokens' scores (B,H,T-sinks)."""
    length, dim = pre_rope.shape[2], pre_rope.shape[-1]
    queries = pre_rope[:, :, sinks:]
    mu = queries.mean(2)
    centered = queries - mu.unsqueeze(2)
    cov = centered.transpose(-1, -2) @ centered / queries.shape[2]
    eye = torch.eye(dim)
    rotations = [_rotate(eye, p * rope).T for p in range(length, length + future)]  # column j: R(p) e_j
    avg = torch.stack(rotations).mean(0)
    mu, cov = mu @ avg.T, avg @ cov @ avg.T
    group = pre_rope.shape[1] // keys.shape[1]
    k = keys[:, :, sinks:].repeat_interleave(group, dim=1)
    logits = (k @ mu.unsqueeze(-1)).squeeze(-1) / dim**0.5 + ((k @ cov) * k).sum(-1) / dim / 2
    probs = logits.softmax(-1)
    return probs.view(k.shape[0], keys.shape[1], group, -1).mean(2) * values[:, :, sinks:].norm(dim=-1)


def test_expected_attention_matches_the_reference_from_queries_before_rope():
    """kvslim rotates each post-RoPE query to the newest position and averages the rotation over the next
    ``future`` offsets; kvpress (the authors' code) takes the queries before RoPE and averages over absolute
    positions. With a large query bias (Qwen2's, added before RoPE) and GQA, both give the same scores."""
    gen = torch.Generator().manual_seed(0)
    dim, length, future, sinks = 16, 40, 24, 4
    rope = 1.0 / (100 ** (torch.arange(0, dim, 2).float() / dim))
    bias = torch.randn(1, 4, 1, dim, generator=gen) * 4
    pre_rope = torch.randn(1, 4, length, dim, generator=gen) + bias  # 4 query heads, 2 KV heads
    angles = torch.arange(length).float()[:, None] * rope
    queries = _rotate(pre_rope, angles)
    keys = _rotate(torch.randn(1, 2, length, dim, generator=gen) + 3, angles)  # a key bias too: large norms
    values = torch.randn(1, 2, length, dim, generator=gen)
    method = kvslim.policy(f"expected_attention(history=None,future={future},sinks={sinks},epsilon=0)", keep=0.5)
    score = method.score(_observation(keys, values, queries, rope))
    expected = _kvpress_expected_attention(pre_rope, keys, values, rope, sinks, future)
    torch.testing.assert_close(score[:, :, sinks:], expected, rtol=1e-3, atol=1e-6)
    eps = kvslim.policy(f"expected_attention(history=None,future={future},sinks={sinks},epsilon=0.01)", keep=0.5)
    shifted = expected + 0.01 * values[:, :, sinks:].norm(dim=-1)  # kvpress: (scores + epsilon) * |v|
    torch.testing.assert_close(eps.score(_observation(keys, values, queries, rope))[:, :, sinks:], shifted,
                               rtol=1e-3, atol=1e-6)


def test_expected_attention_ignores_the_sinks_keys_and_queries():
    """The sinks are out of the softmax and out of the query statistics: changing their keys or queries leaves
    every other token's score as it was (and they are still kept)."""
    gen = torch.Generator().manual_seed(1)
    dim, length = 16, 24
    rope = 1.0 / (100 ** (torch.arange(0, dim, 2).float() / dim))
    keys, values = torch.randn(1, 2, length, dim, generator=gen), torch.randn(1, 2, length, dim, generator=gen)
    queries = torch.randn(1, 4, length, dim, generator=gen)
    other_keys, other_queries = keys.clone(), queries.clone()
    other_keys[:, :, :4] = torch.randn(1, 2, 4, dim, generator=gen) * 10
    other_queries[:, :, :4] = torch.randn(1, 4, 4, dim, generator=gen) * 10
    method = kvslim.policy("expected_attention(history=None)", keep=0.25)
    score = method.score(_observation(keys, values, queries, rope))
    for k, q in ((other_keys, queries), (keys, other_queries)):
        torch.testing.assert_close(method.score(_observation(k, values, q, rope))[:, :, 4:], score[:, :, 4:])
    obs = _observation(other_keys, values, other_queries, rope)
    method.on_prefill(obs)
    kept = obs.layer.dense(torch.float32)[0]
    torch.testing.assert_close(kept[:, :, :4], other_keys[:, :, :4])


def test_expected_attention_covariance_favours_keys_along_the_queries_spread():
    """Two keys with the same mean logit: the one along the direction the queries vary in expects more attention."""
    dim = 8
    rope = torch.zeros(dim // 2)  # no rotation: the statistics are those of the queries as given
    spread = torch.zeros(1, 1, 64, dim)
    spread[..., 0] = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3
    keys = torch.zeros(1, 1, 2, dim)
    keys[0, 0, 0, 0], keys[0, 0, 1, 1] = 2.0, 2.0
    obs = _observation(keys, torch.ones_like(keys), spread, rope)
    score = kvslim.policy("expected_attention(history=64,sinks=0)", keep=0.5).score(obs)
    assert score[0, 0, 0] > score[0, 0, 1]


def test_lagkv_keeps_sinks_the_unreferenced_tail_and_the_standout_token():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 4 + 8 * 4 + 3, 16, generator=gen) * 0.1  # sinks, 4 whole chunks, a partial one
    keys[0, 0, 4 + 5] = torch.randn(16, generator=gen) * 5  # a token far outside its next chunk's range
    obs = _observation(keys)
    method = kvslim.policy("lagkv(lag=8,sinks=4)", budget=4 + 1 + 8 + 3)
    # chunks 0-2 are scored against their successors; chunk 3 has no whole successor and the partial one none
    assert method.protected(obs)[0, 0].tolist() == [True] * 4 + [False] * 24 + [True] * 11
    method.on_prefill(obs)
    kept = obs.layer.dense(torch.float32)[0][0, 0]
    assert any(torch.equal(k, keys[0, 0, 9]) for k in kept)
    torch.testing.assert_close(kept[:4], keys[0, 0, :4])
    torch.testing.assert_close(kept[-3:], keys[0, 0, -3:])


def test_rkv_drops_redundant_copies_first():
    gen = torch.Generator().manual_seed(0)
    distinct = torch.randn(1, 1, 8, 16, generator=gen)
    copies = distinct[:, :, :1].repeat(1, 1, 24, 1) + 0.01 * torch.randn(1, 1, 24, 16, generator=gen)
    keys = torch.cat([distinct, copies], 2)
    obs = _observation(keys)
    kvslim.policy("rkv(window=1,mix=0.0)", budget=8).on_prefill(obs)
    kept = obs.layer.dense(torch.float32)[0]
    near_copy = F.cosine_similarity(kept, distinct[:, :, :1], dim=-1) > 0.99
    assert int(near_copy.sum()) <= 2  # the original and the protected newest token, not the pile of copies


@torch.inference_mode()
def _decode(model, prompt, policy, steps: int) -> tuple[list[list[float]], list[int]]:
    """Greedy steps; after each, the distinct mean tokens per KV head of the layers, and the cache bytes."""
    cache = kvslim.Cache(policy, model.config)
    logits = model(prompt, past_key_values=cache, use_cache=True).logits
    held, sizes = [], []
    for _ in range(steps):
        logits = model(logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
        held.append(sorted({layer.lengths.float().mean().item() for layer in cache.layers}))
        sizes.append(cache.nbytes())
    return held, sizes


@pytest.mark.parametrize("spec", ["snapkv(window=8)", "expected_attention(history=16)", "keydiff", "lagkv(lag=8)",
                                  "rkv", "adakv(keydiff)", "adakv(expected_attention(history=16))"])
def test_decode_budget_is_held_while_generating(llama, prompt, spec):
    """keep=0.5 of 96 tokens at prefill; decoding grows the cache and every 4th step evicts it down to 32."""
    held, sizes = _decode(llama, prompt, kvslim.policy(spec, keep=0.5, decode_budget=32, interval=4), 12)
    assert held == [[49], [50], [51], [32], [33], [34], [35], [32], [33], [34], [35], [32]]
    assert sizes[3] < sizes[2] and sizes[-1] == sizes[3]


def test_decode_eviction_never_drops_the_newest_window(llama, prompt):
    policy = kvslim.policy("snapkv(window=6,decode_budget=20)", keep=0.25)
    cache = kvslim.Cache(policy, llama.config)
    keys_seen = []
    with torch.inference_mode():
        logits = llama(prompt, past_key_values=cache, use_cache=True).logits
        for _ in range(10):
            logits = llama(logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
            held = cache.layers[1].dense(torch.float32)[0]
            keys_seen.append(held[0, :, -1].clone())  # a view of the tail: evictions rewrite it in place
            if len(keys_seen) >= 6:  # the six newest tokens are the last six columns, every step
                newest = torch.stack(keys_seen[-6:], 1)
                torch.testing.assert_close(held[0, :, -6:], newest)


def test_rkv_holds_its_budget_beyond_a_short_prompt(llama):
    """budget=24 with a 10-token prompt: the cache grows to 24 while generating, then stays there."""
    short = torch.randint(1, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    held, _ = _decode(llama, short, kvslim.policy("rkv(window=4)", budget=24), 30)
    assert held[0] == [11] and all(h == [24] for h in held[13:])


def test_decode_parameters_are_validated():
    with pytest.raises(ValueError, match="decode_budget"):
        kvslim.policy("snapkv(decode_budget=0)", keep=0.5)
    with pytest.raises(ValueError, match="interval"):
        kvslim.policy("keydiff(interval=0)", keep=0.5)
    with pytest.raises(ValueError, match="methods that do: adakv"):
        kvslim.policy("snapkv(keydiff)", keep=0.5)
    with pytest.raises(ValueError, match="not a token scorer"):
        kvslim.policy("adakv(think)")


def test_wrapped_specs_round_trip():
    for spec in ("adakv(expected_attention(history=64),floor=0.1)", "adakv(lagkv(lag=16))+kivi4"):
        policy = kvslim.policy(spec, keep=0.25)
        assert kvslim.policy(policy.spec).spec == policy.spec
        assert policy.spec.startswith("adakv(")
