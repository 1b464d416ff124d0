"""auto: budgets per request, layer and KV head from the observed attention; a memory target holds its mean."""
from __future__ import annotations

import math

import pytest
import torch

import kvslim
from kvslim.cache.layer import LayerKV
from kvslim.cli import main
from kvslim.methods import Observation
from kvslim.methods.auto import observed_mass
from kvslim.models import tiny_model

T, D, WINDOW = 64, 8, 4


def _observation(peaked: list[bool], layer_idx: int = 0, num_layers: int = 1, length: int = T) -> Observation:
    """A prompt layer whose KV head ``h`` has its window's queries all on one token (``peaked[h]``) or on none
    (zero queries: flat attention)."""
    g = torch.Generator().manual_seed(layer_idx)
    keys = torch.randn(1, len(peaked), length, D, generator=g)
    queries = torch.zeros(1, len(peaked), 8, D)
    for h, on_one in enumerate(peaked):
        if on_one:
            keys[0, h, 5] = 10.0
            queries[0, h] = keys[0, h, 5]
    layer = LayerKV(layer_idx)
    layer.append(keys, keys.clone())
    layer.state["prompt"] = layer.state["real"] = torch.tensor([length])
    return Observation(layer, num_layers, queries, 1.0, "prefill")


def _budget(spec: str, obs: Observation) -> list[int]:
    kvslim.policy(spec).on_prefill(obs)
    assert obs.layer.state["budget"].tolist() == obs.layer.lengths.tolist()  # what it chose is what it holds
    return obs.layer.lengths[0].tolist()


def test_tolerance_gives_a_peaked_head_fewer_tokens_than_a_flat_one():
    peaked, flat = _budget(f"auto(tolerance=0.1,window={WINDOW},kernel=1,floor=0)", _observation([True, False]))
    assert peaked == WINDOW + 1  # the window (protected) and the one token its queries attend
    assert flat >= math.floor(0.9 * T)


def test_tolerance_sets_the_budget_per_request():
    """A long diffuse prompt keeps more than a short peaked one under the same tolerance."""
    spec = f"auto(tolerance=0.1,window={WINDOW})"
    short_peaked = _budget(spec, _observation([True, True], length=32))
    long_flat = _budget(spec, _observation([False, False], length=128))
    assert max(short_peaked) < min(long_flat)


def test_tolerance_floor_keeps_every_head_a_share_of_the_mean_so_far():
    peaked, flat = _budget(f"auto(tolerance=0.1,window={WINDOW},kernel=1,floor=0.5)", _observation([True, False]))
    assert peaked == math.ceil((WINDOW + 1 + flat) / 2 * 0.5)


def _self_attending_window(length: int = T) -> Observation:
    """One KV head whose window's queries attend mostly to the window itself (as a real model's last prompt tokens
    do) and evenly to every other token."""
    keys = torch.zeros(1, 1, length, D)
    keys[0, 0, -WINDOW:, 0] = 1.0
    layer = LayerKV(0)
    layer.append(keys, keys.clone())
    layer.state["prompt"] = layer.state["real"] = torch.tensor([length])
    queries = torch.zeros(1, 1, WINDOW, D)
    queries[..., 0] = 8.0
    return Observation(layer, 1, queries, 1.0, "prefill")


def test_tolerance_is_over_the_droppable_tokens_not_the_protected_ones():
    """The window holds nearly all its own queries' mass; it must not count toward the tolerance, else the window
    alone meets it and the context (where a needle holds ~1% of the mass) is dropped whole."""
    obs = _self_attending_window()
    assert observed_mass(obs.attention(WINDOW))[0, 0, -WINDOW:].sum() > 0.9
    (kept,) = _budget(f"auto(tolerance=0.2,window={WINDOW},kernel=1,floor=0)", obs)
    assert kept >= WINDOW + math.ceil(0.8 * (T - WINDOW))


def test_tolerance_covers_each_query_not_their_sum():
    """Seven window queries rest on one token, the last reads another (the question reading the needle): the first
    holds 7/8 of the summed mass, which meets tolerance=0.2 alone, but the last query's token must stay too."""
    keys = torch.zeros(1, 1, T, D)
    keys[0, 0, 5, 0] = keys[0, 0, 20, 1] = 10.0
    queries = torch.zeros(1, 1, 8, D)
    queries[0, 0, :7, 0] = queries[0, 0, 7, 1] = 10.0
    layer = LayerKV(0)
    layer.append(keys, keys.clone())
    layer.state["prompt"] = layer.state["real"] = torch.tensor([T])
    obs = Observation(layer, 1, queries, 1.0, "prefill")
    assert _budget("auto(tolerance=0.2,window=8,kernel=1,floor=0)", obs) == [10]  # the window, both read tokens
    kept = obs.layer.dense(torch.float32)[0][0, 0]
    assert kept[:, 0].max() == 10.0 and kept[:, 1].max() == 10.0


def test_tolerance_keeps_a_pooled_hit_whole():
    """SnapKV's max pooling gives a hit's neighbours its score (a number's digits): the budget keeps all of them,
    not the older half that ties put first."""
    keys = torch.zeros(1, 1, T, D)
    keys[0, 0, 20, 0] = 10.0
    queries = torch.zeros(1, 1, 8, D)
    queries[..., 0] = 10.0
    layer = LayerKV(0)
    layer.append(keys, keys.clone())
    layer.state["prompt"] = layer.state["real"] = torch.tensor([T])
    obs = Observation(layer, 1, queries, 1.0, "prefill")
    assert _budget("auto(tolerance=0.2,window=8,kernel=7,floor=0)", obs) == [8 + 7]  # the window, 17..23


@pytest.mark.parametrize("tolerance", [0.2, 0.99])
def test_tolerance_keeps_window_and_sinks_and_starves_no_layer(llama, prompt, tolerance):
    """On a model: every head keeps its sinks and its whole observation window (the question) whatever the
    tolerance, and at least ``floor`` x the mean budget of the request's heads up to its layer."""
    window, sinks, floor = 8, 2, 0.2
    full = kvslim.Cache(kvslim.policy("full"), llama.config)
    policy = kvslim.policy(f"auto(tolerance={tolerance},window={window},sinks={sinks},floor={floor})")
    cache = kvslim.Cache(policy, llama.config)
    with torch.no_grad():
        llama(prompt, past_key_values=full, use_cache=True)
        llama(prompt, past_key_values=cache, use_cache=True)
    for layer, whole in zip(cache.layers, full.layers):
        keys, _, valid = layer.dense(torch.float32)
        every = whole.dense(torch.float32)[0]
        assert bool((layer.lengths < prompt.shape[1]).any())  # it did evict
        for head in range(keys.shape[1]):
            held = keys[0, head][valid[0, head]]
            assert torch.equal(held[:sinks], every[0, head, :sinks])
            assert torch.equal(held[-window:], every[0, head, -window:])
    seen = []
    for k in policy.chosen:
        seen.append(k.float())
        least = math.ceil(torch.cat(seen, -1).mean().item() * floor)
        assert int(k.min()) >= least


def test_memory_target_shares_a_layer_among_heads_by_mass():
    peaked, flat = _budget(f"auto(keep=0.25,window={WINDOW},floor=0.2)", _observation([True, False]))
    budget = math.ceil(T * 0.25)
    assert peaked + flat == 2 * budget
    assert math.ceil(budget * 0.2) <= peaked < flat


def test_memory_target_gives_diffuse_layers_more_and_holds_the_request_mean():
    policy = kvslim.policy(f"auto(keep=0.25,window={WINDOW})")
    layers = [_observation([not flat, not flat], i, 4) for i, flat in enumerate([True, False, True, False])]
    for obs in layers:
        policy.on_prefill(obs)
    kept = [int(obs.layer.lengths.sum()) for obs in layers]
    assert sum(kept) == 4 * 2 * math.ceil(T * 0.25)
    assert kept[1] < kept[0] and kept[1] < kept[2]  # a peaked layer after diffuse ones gives its tokens away
    assert [k.sum().item() for k in policy.chosen] == kept
    assert all(int(obs.layer.lengths.min()) >= math.ceil(math.ceil(T * 0.25) * 0.2) for obs in layers)  # the floor


@pytest.mark.parametrize("spec", ["auto(keep=0.25)", "auto(tolerance=0.2)"])
def test_a_padded_batch_budgets_each_request_as_alone(llama, spec):
    prompts = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 71)]
    _, batched, _ = kvslim.generate_ids(llama, prompts, spec, max_new_tokens=1)
    alone = [kvslim.generate_ids(llama, [p], spec, max_new_tokens=1)[1].tokens_per_sequence()[0] for p in prompts]
    assert batched.tokens_per_sequence() == alone


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_mean_kept_share_equals_keep(model, prompt, keep):
    cache = kvslim.Cache(kvslim.policy(f"auto(keep={keep})"), model.config)
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
    lengths = torch.stack([layer.lengths for layer in cache.layers]).float()  # (L, B, H)
    assert lengths.mean().item() == math.ceil(prompt.shape[1] * keep)
    assert lengths.min().item() >= 1
    fixed = kvslim.Cache(kvslim.policy(f"snapkv(keep={keep})"), model.config)
    with torch.no_grad():
        model(prompt, past_key_values=fixed, use_cache=True)
    kv_bytes = [sum(seg.nbytes() for layer in c.layers for seg in layer.segments) for c in (cache, fixed)]
    assert kv_bytes[0] == kv_bytes[1]  # the bytes of a fixed keep, physically


def test_tolerance_zero_keeps_everything_and_equals_full_greedy(llama, prompt):
    ids = prompt[0].tolist()
    full, _, _ = kvslim.generate_ids(llama, [ids], "full", max_new_tokens=12)
    auto, cache, _ = kvslim.generate_ids(llama, [ids], "auto(tolerance=0)", max_new_tokens=12)
    assert auto == full
    assert cache.stats()["kept_ratio"] == 1.0


def test_any_scorer_and_its_spec_round_trips():
    policy = kvslim.policy("auto(keydiff,tolerance=0.2)")
    assert type(policy).__mro__[1].__name__ == "KeyDiff"
    assert kvslim.policy(policy.spec).spec == policy.spec
    assert kvslim.policy("auto(snapkv(window=16),keep=0.3)").window == 16


@pytest.mark.parametrize("spec, message", [
    ("auto", "exactly one of keep"),
    ("auto(keep=0.25,tolerance=0.1)", "exactly one of keep"),
    ("auto(tolerance=1)", r"in \[0, 1\)"),
    ("auto(h2o,keep=0.25)", "selects once per prefill"),
    ("auto(snapkv(keep=0.3),keep=0.25)", "give keep, budget or tolerance to auto"),
])
def test_bad_specs_name_the_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        kvslim.policy(spec)


def test_kvslim_methods_lists_auto(capsys):
    assert main(["methods"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("auto "))
    assert "tolerance" in line and "keep" in line


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_sliding_window_layers_budget_within_what_they_hold(arch):
    """A sliding layer holds at most W - 1 tokens: its fixed budget is a share of those, and the request's mean
    holds over the layers' fixed budgets; decoding then runs within the windows."""
    model = tiny_model(arch, "gqa", attn_implementation="eager" if arch == "gemma2" else "sdpa")
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = kvslim.Cache(kvslim.policy("auto(keep=0.5,window=4)"), model.config)
    with torch.no_grad():
        token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        kept = sum(int(layer.lengths.sum()) for layer in cache.layers)
        heads = cache.layers[0].lengths.shape[-1]
        held = [40 if layer.window is None else min(40, layer.window - 1) for layer in cache.layers]
        assert kept == sum(heads * math.ceil(n * 0.5) for n in held)
        for _ in range(8):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    assert all((layer.lengths < layer.window).all() for layer in cache.layers if layer.window)
