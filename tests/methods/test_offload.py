"""Offloading methods (KCache, PQCache) and the partial-attention protocol they attend through."""
from __future__ import annotations

import math

import pytest
import torch

import kvslim
from kvslim.cache import attention as routing
from kvslim.cache.offload import KCacheSegment, TopN, top_per_kv_head
from kvslim.cache.pq import PQSegment, approximate_logits, split_subspaces
from kvslim.cache.segments import DenseSegment, merge_partials, ragged_to_padded
from kvslim.models import load_config, tiny_model
from kvslim.shape import KVShape

KCACHE_ALL = "kcache(n=1000000,full_layers=1,recent=3)"  # N >= every token: attention must equal full
PQCACHE_ALL = "pqcache(k=1000000,window=2,m=4,bits=3)"


def _ragged_dense(gen: torch.Generator, lengths: torch.Tensor, dim: int = 8) -> DenseSegment:
    rows = int(lengths.sum())
    return DenseSegment(torch.randn(rows, dim, generator=gen), torch.randn(rows, dim, generator=gen), lengths)


def test_partials_merged_over_segments_equal_one_masked_attention():
    gen = torch.Generator().manual_seed(0)
    first = _ragged_dense(gen, torch.tensor([[5, 3], [7, 7]]))
    second = _ragged_dense(gen, torch.tensor([[2, 4], [1, 3]]))
    query = torch.randn(2, 4, 1, 8, generator=gen)
    parts = [seg.attend(query, seg.valid_mask()[:, :, None, :], 0.3) for seg in (first, second)]
    out, lse = merge_partials(parts)
    keys, values, valid = (torch.cat([a, b], 2) for a, b in zip(first.dense(), second.dense()))
    ref = routing.masked_attention(query, keys, values, valid[:, :, None, :], 0.3, "eager")
    torch.testing.assert_close(out.transpose(1, 2), ref, rtol=1e-5, atol=1e-6)
    logits = (query @ keys.repeat_interleave(2, 1).transpose(-1, -2) * 0.3).masked_fill(
        ~valid.repeat_interleave(2, 1)[:, :, None, :], float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))


def test_top_n_per_kv_head_is_exact_against_brute_force():
    gen = torch.Generator().manual_seed(1)
    batch, heads, rows, length = 2, 3, 6, 40  # rows: 3 query heads per KV head x 2 queries
    logits = torch.randn(batch, heads, rows, length, generator=gen) * 3
    allowed = torch.rand(batch, heads, rows, length, generator=gen) < 0.8
    allowed[1, 2] = False
    allowed[1, 2, :, :5] = True  # a row that allows fewer tokens than it asks for
    n = torch.tensor([[1, 7, 40], [12, 3, 9]])
    index, kept = top_per_kv_head(logits, allowed, n)
    for b in range(batch):
        for h in range(heads):
            scores = []
            for t in range(length):
                probs = [
                    math.exp(logits[b, h, r, t]) / sum(math.exp(logits[b, h, r, u]) for u in range(length) if allowed[b, h, r, u])
                    for r in range(rows) if allowed[b, h, r, t]
                ]
                if probs:
                    scores.append((max(probs), t))
            expected = {t for _, t in sorted(scores, reverse=True)[: int(n[b, h])]}
            assert set(index[b, h][kept[b, h]].tolist()) == expected


def _teacher_forced_logits(model, ids, policy, prompt: int, chunks: int = 1):
    """Logits of every step after a ``prompt``-token prefill (fed in ``chunks``), then one token at a time."""
    cache = kvslim.Cache(kvslim.policy(policy), model.config)
    bounds = [prompt * i // chunks for i in range(chunks + 1)]
    with torch.no_grad():
        out = [model(ids[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in zip(bounds, bounds[1:])]
        out += [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(prompt, ids.shape[1])]
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("policy, segment", [(KCACHE_ALL, KCacheSegment), (PQCACHE_ALL, PQSegment)])
@pytest.mark.parametrize("chunks", [1, 2])
def test_reading_every_token_equals_full_attention(model, policy, segment, chunks):
    ids = torch.randint(1, 256, (1, 72), generator=torch.Generator().manual_seed(2))
    ref, _ = _teacher_forced_logits(model, ids, "full", 60, chunks)
    got, cache = _teacher_forced_logits(model, ids, policy, 60, chunks)
    assert isinstance(cache.layers[-1].segments[0], segment)  # the steps really ran over offloaded storage
    assert cache.stats()["host_nbytes"] > 0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", [KCACHE_ALL, PQCACHE_ALL, f"snapkv(keep=0.5,window=8)+{KCACHE_ALL}"])
def test_batch_of_different_lengths_matches_full_storage(llama, policy):
    """Left padding is dropped at prefill, so offloaded rows are ragged per sequence; results must not change."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 256, (n,), generator=gen).tolist() for n in (50, 31, 64)]
    reference = policy.split("+")[0] if "+" in policy else "full"
    expected, _, _ = kvslim.generate_ids(llama, prompts, reference, max_new_tokens=10)
    got, _, _ = kvslim.generate_ids(llama, prompts, policy, max_new_tokens=10)
    assert got == expected


@pytest.mark.parametrize("policy", ["kcache(fraction=0.25,full_layers=1,recent=4)", "pqcache(fraction=0.25,window=8,m=4,bits=4)"])
def test_generate_through_the_cache_accounts_device_and_host_bytes(llama, policy):
    ids = torch.randint(1, 256, (1, 90), generator=torch.Generator().manual_seed(4))
    cache = kvslim.Cache(kvslim.policy(policy), llama.config)
    out = llama.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=cache)
    assert out.shape[1] == 110
    stats = cache.stats()
    assert stats["nbytes"] == stats["device_nbytes"] + stats["host_nbytes"]
    assert 0 < stats["device_nbytes"] < stats["full_nbytes"] and stats["host_nbytes"] > 0
    assert stats["kept_ratio"] == 1.0  # offloading drops nothing


def test_kcache_device_bytes_at_4k_tokens_are_at_most_055_of_full():
    llama8b = KVShape.from_config(load_config("llama-3.1-8b"))
    kcache = kvslim.policy("kcache", fraction=0.1)
    full = kvslim.policy("full").expected_bytes(llama8b, 4096)
    assert kcache.expected_bytes(llama8b, 4096) == full * (2 + 30 / 2) // 32  # 0.53125 of full
    assert kcache.expected_bytes(llama8b, 4096) <= 0.55 * full

    model = tiny_model("llama", "gqa", seed=0)  # 2 layers: offload both so the run measures the split
    policy = kvslim.policy("kcache", fraction=0.1, full_layers=0, recent=8)
    ids = torch.randint(1, 256, (1, 4090), generator=torch.Generator().manual_seed(5))
    _, cache, _ = kvslim.generate_ids(model, [ids[0].tolist()], policy, max_new_tokens=6)
    stats = cache.stats()
    shape = KVShape.from_config(model.config, torch.float32)
    # the prompt's keys, plus keys and values of the 5 fed-back tokens (fewer than `recent`: still on the device)
    assert stats["device_nbytes"] == policy.expected_bytes(shape, 4090) + 5 * shape.bytes_per_token
    assert stats["device_nbytes"] <= 0.55 * stats["full_nbytes"]


def test_pq_codes_reconstruct_structured_keys_within_bound():
    """Keys drawn around 8 centres per sub-space (noise 5% of the spread): 64 centroids must recover them.

    Bound: relative Frobenius error below 0.1 (the noise alone is about 0.05 of the key norm).
    """
    gen = torch.Generator().manual_seed(6)
    batch, heads, length, m, sub = 2, 2, 300, 4, 4
    centres = torch.randn(batch, heads, m, 8, sub, generator=gen) * 2
    pick = torch.randint(0, 8, (batch, heads, m, length), generator=gen)
    parts = centres.gather(3, pick.unsqueeze(-1).expand(-1, -1, -1, -1, sub))
    parts = parts + 0.1 * torch.randn(parts.shape, generator=gen)
    keys = parts.permute(0, 1, 3, 2, 4).reshape(batch, heads, length, m * sub)
    keep = torch.ones(batch, heads, length, dtype=torch.bool)
    seg = PQSegment.build(keys, keys, keep, m, 6, TopN(n=8), iterations=10, seed=0)
    codes, _ = ragged_to_padded(seg.codes.long(), seg.lengths)
    recon = seg.centroids.gather(3, codes.permute(0, 1, 3, 2).unsqueeze(-1).expand(-1, -1, -1, -1, sub))
    error = (recon - split_subspaces(keys, m)).norm() / keys.norm()
    assert error < 0.1, f"relative reconstruction error {error:.3f}"
    # the approximate scores are exactly q · (reconstructed key): the table lookup loses nothing more
    query = torch.randn(batch, heads * 2, 1, m * sub, generator=gen)
    approx = approximate_logits(query, seg.centroids, codes, 0.5)
    recon_keys = recon.permute(0, 1, 3, 2, 4).reshape(batch, heads, length, m * sub)
    exact = query.reshape(batch, heads, 2, -1) @ recon_keys.transpose(-1, -2) * 0.5
    torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-5)


def test_pqcache_keeps_the_window_on_the_device(llama):
    ids = torch.randint(1, 256, (1, 80), generator=torch.Generator().manual_seed(7))
    _, cache = _teacher_forced_logits(llama, ids, "pqcache(fraction=0.2,window=8,m=4,bits=4)", 70)
    for layer in cache.layers:
        coded, local = layer.segments[0], layer.segments[1:]
        assert isinstance(coded, PQSegment)
        # 70 prompt tokens leave 8 on the device; 10 decoded: at 16 the oldest 8 were coded, 2 more since
        assert sum(s.longest for s in local) == 10 and coded.longest == 70
    pq = kvslim.policy("pqcache", fraction=0.2, window=8, m=4, bits=4)
    shape = KVShape.from_config(llama.config, torch.float32)
    # right after a 70-token prefill: 8 exact tokens, 62 x 4 one-byte codes and 16 x 16 centroids, per KV head
    assert pq.expected_bytes(shape, 70) == 2 * 2 * (8 * 2 * 16 * 4 + 62 * 4 + 16 * 16 * 4)


@pytest.mark.parametrize("spec, message", [
    ("kcache", "exactly one of n"), ("kcache(fraction=1.5)", "fraction"), ("kcache(n=4,recent=0)", "recent"),
    ("pqcache", "exactly one of k"), ("pqcache(k=4,bits=9)", "bits"), ("kcache(n=4)+snapkv(keep=0.5)", "must come last"),
    ("pqcache(k=4)+kivi2", "must come last"),
])
def test_invalid_parameters_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        kvslim.policy(spec)


def test_pq_sub_spaces_must_divide_the_head_dimension(llama):
    with pytest.raises(ValueError, match="divide the head dimension"):
        kvslim.generate_ids(llama, [list(range(1, 40))], "pqcache(k=4,m=3,window=4)", max_new_tokens=2)


@pytest.mark.slow
def test_kcache_reading_10_percent_finds_the_pass_key_where_full_does(smollm2, passkeys):
    """10 pass-key prompts of 2k tokens (the shared real-model fixtures), KCache reading 10% of the tokens."""
    from passkey_helpers import assert_keeps_pass_keys, retrieved

    hits = retrieved(smollm2, passkeys, "kcache", fraction=0.1)
    assert_keeps_pass_keys(hits, "kcache(fraction=0.1)")



class _Chars:
    """A tokenizer for ``kvslim.generate`` on a tiny model: one token per character."""

    eos_token_id = pad_token_id = 0

    def encode(self, text):
        return [1 + ord(c) % 250 for c in text]

    def decode(self, ids, **_):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.mark.parametrize("policy", ["full", "kcache(fraction=0.25,full_layers=1,recent=4)"])
def test_generate_reports_host_bytes_per_sequence(llama, policy):
    out = kvslim.generate(llama, _Chars(), ["a" * 70, "bc" * 45], policy=policy, max_new_tokens=6)
    for gen in out:
        assert gen.kv_bytes_end > 0
        if policy == "full":
            assert gen.kv_host_bytes_end == 0
        else:  # KCache: the second layer's values (a quarter of the two layers' keys and values) in host memory
            assert 0.2 < gen.kv_host_bytes_end / gen.kv_bytes_end < 0.3
