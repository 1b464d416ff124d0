"""The tail buffers (cache/buffers.py): decoding writes in place, and static mode (max_length) decodes the same
tokens as the growing default with fixed shapes."""
from __future__ import annotations

import pytest
import torch

import kvslim
from kvslim.cache.buffers import GrowingSegment, StaticSegment, grown_capacity
from kvslim.models import tiny_model


def _prefill(model, policy: str, max_length: int | None = None, prompt: int = 100):
    ids = torch.randint(1, 256, (1, prompt), generator=torch.Generator().manual_seed(0))
    cache = kvslim.Cache(kvslim.policy(policy), model.config, max_length=max_length)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
    return cache, logits[:, -1:].argmax(-1)


def _greedy(model, policy: str, max_length: int | None, steps: int = 40) -> list[int]:
    cache, token = _prefill(model, policy, max_length)
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(token))
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return tokens


@pytest.mark.parametrize("policy", ["full", "snapkv(keep=0.25,window=8)"])
def test_decoding_writes_in_place_until_the_room_runs_out(llama, policy):
    """No per-step torch.cat: the tail's storage stays put while it has room, then regrows once, geometrically."""
    cache, token = _prefill(llama, policy)
    with torch.no_grad():
        token = llama(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)  # evicted rows -> buffer
        tail = cache.layers[0].segments[-1]
        assert isinstance(tail, GrowingSegment) and len(cache.layers[0].segments) == 1
        pointer, room, moves = tail.key_buffer.data_ptr(), tail.capacity, 0
        for _ in range(room - tail.filled + 2):
            token = llama(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tail = cache.layers[0].segments[-1]
            if tail.key_buffer.data_ptr() != pointer:
                moves += 1
                assert tail.capacity == grown_capacity(room + 1) and tail.filled == room + 1
                pointer = tail.key_buffer.data_ptr()
    assert moves == 1
    keys, _, valid = cache.layers[0].dense(torch.float32)
    assert keys.data_ptr() == pointer and valid.all()  # attention reads the buffer itself


def test_growing_and_dense_rows_agree():
    keys, values = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    seg = GrowingSegment.holding(keys, values).append(keys[:, :, :2], values[:, :, :2])
    expected = torch.cat([keys, keys[:, :, :2]], 2)
    torch.testing.assert_close(seg.dense()[0], expected)
    torch.testing.assert_close(seg.keys, expected.reshape(-1, 4))
    assert seg.tokens == 2 * 3 * 7 and (seg.lengths == 7).all() and seg.nbytes() == 2 * 3 * 7 * 2 * 4 * 4


@pytest.mark.parametrize(("policy", "max_length"), [
    ("full", 160), ("snapkv(keep=0.25)", 160), ("kivi4(residual=16,group=32)", 160), ("kivi4", 160),
    ("adakv(keep=0.25)", 160),
    ("snapkv(keep=0.25)", 65),  # max_length bounds what decoding holds (25 kept + 40 new), not the 100-token prompt
    ("adakv(keep=0.25)", 72),  # ragged heads: the longest holds more than 25
])
def test_static_mode_decodes_the_same_tokens(llama, policy, max_length):
    assert _greedy(llama, policy, max_length=max_length) == _greedy(llama, policy, max_length=None)


def test_static_decoding_keeps_shapes_and_storage(llama):
    """Every decoding step of a static cache attends over the same buffers with the same shapes: what graphs need."""
    cache, token = _prefill(llama, "snapkv(keep=0.25)", max_length=128)
    seen = set()
    with torch.no_grad():
        for _ in range(20):
            token = llama(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tail = cache.layers[1].segments[-1]
            assert isinstance(tail, StaticSegment) and len(cache.layers[1].segments) == 1
            keys, values, valid = cache.layers[1].dense(torch.float32)
            seen.add((keys.data_ptr(), values.data_ptr(), tuple(keys.shape), tuple(valid.shape)))
    assert len(seen) == 1 and next(iter(seen))[2][2] == 128
    assert (cache.layers[1].lengths == 25 + 20).all()  # ceil(100 * 0.25) kept, then one per step


def test_static_mode_errors(llama):
    cache, token = _prefill(llama, "full", max_length=101)
    with torch.no_grad():
        llama(token, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="max_length=101"):
            llama(token, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="max_length=20"):  # the prompt is read, but the 25 kept do not fit
        _prefill(llama, "snapkv(keep=0.25)", max_length=20)
    with pytest.raises(ValueError, match="sliding-window"):
        kvslim.Cache(kvslim.policy("full"), tiny_model("mistral", "gqa", seed=0).config, max_length=64)


@pytest.mark.parametrize("policy", ["full", "snapkv(keep=0.25)"])
def test_static_decode_step_compiles_as_one_graph_without_symbolic_inputs(llama, policy):
    """torch.compile traces a static decoding step whole (fullgraph) once: the step counts on the device, so no host
    count becomes a symbolic input (CUDA graphs would record a graph per value of one) and nothing recompiles. The
    tokens are the eager cache's, eager steps after compiled ones go on from the right counts, and the cache reports
    every decoded token. The eager backend keeps the check to tracing (no codegen)."""
    graphs: list[list[object]] = []

    def backend(graph, inputs):
        graphs.append([x for x in inputs if not isinstance(x, torch.Tensor)])
        return graph.forward

    torch._dynamo.reset()
    forward = torch.compile(llama.forward, backend=backend, fullgraph=True)
    eager_tokens = _greedy(llama, policy, max_length=160, steps=16)
    cache, token = _prefill(llama, policy, max_length=160)
    tokens = []
    with torch.no_grad():
        for step in range(16):
            tokens.append(int(token))
            where = torch.tensor([100 + step])
            run = forward if step < 12 else llama.forward  # the last steps eager, after compiled ones
            logits = run(token, past_key_values=cache, use_cache=True, position_ids=where[None],
                         cache_position=where).logits
            token = logits[:, -1:].argmax(-1)
    torch._dynamo.reset()
    assert tokens == eager_tokens
    assert graphs == [[]]  # one graph, no symbolic int among its inputs
    assert cache.get_seq_length() == 116 and cache.tokens_seen() == [116]
    tail = cache.layers[0].segments[-1]
    assert isinstance(tail, StaticSegment) and tail.filled == int(tail.lengths.max())
