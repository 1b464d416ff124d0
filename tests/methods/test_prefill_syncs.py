"""The prefill's eviction path reads nothing back from the device where the host knows the sizes, and stores the same
tokens as the boolean-mask path it replaces (a host read per layer per prompt stalls a GPU prefill)."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import kvslim
from kvslim.cache.layer import LayerKV
from kvslim.cache.segments import DenseSegment, kept_positions, ragged_to_padded
from kvslim.engine.compression import Compression
from kvslim.methods import Observation

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")


def _layer(keys: torch.Tensor, values: torch.Tensor) -> LayerKV:
    layer = LayerKV(0)
    layer.append(keys, values)
    layer.state["prompt"] = layer.state["real"] = torch.full((keys.shape[0],), keys.shape[2])
    return layer


@pytest.mark.parametrize("spec", ["snapkv(keep=0.3)", "keydiff(keep=0.1)", "snapkv(budget=37)", "knorm(keep=0.7)",
                                  "expected_attention(keep=0.25)", "pyramidkv(keep=0.3)"])
@pytest.mark.parametrize("n", [1, 7, 40, 333, 1000])
def test_host_budget_is_the_device_budget(spec: str, n: int) -> None:
    method = kvslim.policy(spec)
    layer = _layer(torch.zeros(2, 3, n, 4), torch.zeros(2, 3, n, 4))
    obs = Observation(layer, 4, torch.zeros(2, 6, n, 4), 0.5, "prefill")
    device_budget = method.layer_budget(obs, obs.valid.sum(-1))
    assert method.uniform_budget(obs) == int(device_budget[0, 0]) and bool((device_budget == device_budget[0, 0]).all())


def test_no_host_budget_once_the_layer_is_ragged() -> None:
    method = kvslim.policy("snapkv(keep=0.5)")
    layer = _layer(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4))
    layer.select(torch.rand(1, 2, 8) > 0.5)
    assert method.uniform_budget(Observation(layer, 1, torch.zeros(1, 4, 8, 4), 0.5, "prefill")) is None


def test_gathers_match_boolean_indexing() -> None:
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 11, 4, generator=gen), torch.randn(2, 3, 11, 5, generator=gen)
    keep = torch.rand(2, 3, 11, generator=gen) > 0.4
    segment = DenseSegment.from_padded(keys, values, keep)
    assert torch.equal(segment.keys, keys[keep]) and torch.equal(segment.values, values[keep])
    assert (segment.longest, segment.tokens, segment.uniform) == (int(keep.sum(-1).max()), int(keep.sum()), False)
    assert torch.equal(kept_positions(keep, int(keep.sum())), keep.flatten().nonzero().squeeze(-1))
    padded, valid = ragged_to_padded(keys[keep], keep.sum(-1))
    reference = torch.zeros_like(padded)
    reference[valid] = keys[keep]
    assert torch.equal(padded, reference) and torch.equal(valid.sum(-1), keep.sum(-1))
    top = torch.rand(2, 3, 11, generator=gen).argsort(-1).argsort(-1) < 4  # exactly 4 per row
    uniform = DenseSegment.from_padded(keys, values, top, width=4)
    assert torch.equal(uniform.keys, keys[top]) and uniform.uniform and uniform.longest == 4
    assert torch.equal(uniform.dense()[0], keys[top].view(2, 3, 4, 4))


@pytest.mark.parametrize("spec", ["snapkv(keep=0.25,window=4)", "keydiff(keep=0.25)", "streaming(keep=0.25,sinks=2)",
                                  "expected_attention(keep=0.25,future=8)", "pyramidkv(keep=0.25,window=4)"])
def test_uniform_prefill_eviction_reads_nothing_back(spec: str) -> None:
    """The engine's prefill hook for one layer: scoring, selection and the kept rows, with no host sync."""
    gen = torch.Generator().manual_seed(1)
    compression = Compression(kvslim.policy(spec), num_layers=2, scaling=0.25, rope=torch.rand(4, generator=gen))
    queries, keys, values = (torch.randn(h, 64, 8, generator=gen) for h in (4, 2, 2))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        kept_k, kept_v, lens = compression(1, queries, keys, values)
    assert [e.name for e in prof.events() if e.name in SYNC_OPS] == []
    width = int(compression.evict.planned_tokens(64, 1, 2))  # the layer's budget, every head
    assert width < 64 and kept_k.shape == (2, width, 8) and torch.equal(lens, torch.full((2,), width))
