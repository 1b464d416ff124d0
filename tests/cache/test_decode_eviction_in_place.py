"""Decode-time eviction on a layer whose rows all hold the same count is done in place (cache/layer.py select with
``count``, buffers.py keep_columns/drop): the same tokens as the ragged path, and a decoding step reads nothing back
from the device, as ragged heads (KVzip's one budget over all layers and heads) do not either."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kvslim
from kvslim.cache.buffers import GrowingSegment, grown_capacity
from kvslim.cache.layer import LayerKV
from kvslim.methods.kvzip import reconstruct

#: the aten ops that read a device value on the host (a GPU sync): ``.item()``/``int()``, and a mask's nonzero
SYNCS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func in SYNCS
        return func(*args, **(kwargs or {}))


def _decode(model, spec: str, steps: int) -> tuple[list[torch.Tensor], kvslim.Cache]:
    ids = torch.randint(1, 256, (1, 96), generator=torch.Generator().manual_seed(2))
    cache = kvslim.Cache(kvslim.policy(spec), model.config)
    logits = []
    with torch.no_grad():
        token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        if spec.startswith("kvzip"):
            reconstruct(model, cache, ids)
        for _ in range(steps):
            logits.append(model(token, past_key_values=cache, use_cache=True).logits)
            token = logits[-1][:, -1:].argmax(-1)
    return logits, cache


IN_PLACE = ["streaming(keep=0.25)", "streaming(budget=20,sinks=4,window=3)", "tova(keep=0.25)",
            "snapkv(keep=0.25,window=4,decode_budget=30)", "h2o(keep=0.25,window=8)", "merge(tova(keep=0.25))",
            "tova(keep=0.25,interval=3)"]


@pytest.mark.parametrize("spec", IN_PLACE)
def test_in_place_eviction_keeps_what_the_ragged_path_keeps(llama, spec, monkeypatch):
    """Bit for bit the logits and kept keys of the general path (forced by hiding the layer's per-row count),
    over enough steps that the tail's buffers regrow after evictions moved its start."""
    _, prefilled = _decode(llama, spec, 0)
    fast, cache = _decode(llama, spec, 80)
    for layer in [*prefilled.layers, *cache.layers]:  # one open tail whose buffers give the evicted room back
        tail = layer.segments[0]
        assert isinstance(tail, GrowingSegment) and len(layer.segments) == 1
        assert tail.capacity <= grown_capacity(tail.filled + 1)  # room for the step's token, before it was evicted
    monkeypatch.setattr(LayerKV, "held_per_row", property(lambda self: None))
    general, reference = _decode(llama, spec, 80)
    for a, b in zip(fast, general):
        assert torch.equal(a, b)
    for layer, ref in zip(cache.layers, reference.layers):
        assert torch.equal(layer.dense(torch.float32)[0], ref.dense(torch.float32)[0])


@pytest.mark.parametrize("spec", ["streaming(keep=0.25)", "tova(keep=0.25)", "snapkv(keep=0.25,decode_budget=30)",
                                  "kvzip(keep=0.25,chunk=32)"])
def test_a_decoding_step_makes_no_host_sync(llama, spec, monkeypatch):
    _, cache = _decode(llama, spec, 10)  # the budget's host range is read once, at the first evicting step
    if spec.startswith("kvzip"):  # heads kept different counts: ragged rows, padded at every step
        assert any(len({*layer.segments[0].lengths.flatten().tolist()}) > 1 for layer in cache.layers)
    token = torch.ones(1, 1, dtype=torch.long)
    reads = []  # ``tolist``/``cpu`` read a device tensor without an aten op of their own
    for name in ("tolist", "cpu"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k: reads.append(_n) or
                            _f(self, *a, **k))
    with torch.no_grad(), SyncCounter() as counter:
        llama(token, past_key_values=cache, use_cache=True)
    assert counter.syncs == 0 and reads == []
