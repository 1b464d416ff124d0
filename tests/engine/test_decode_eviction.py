"""The query ring of decode-time compression gives back what ScoredEviction.remember keeps: the newest queries."""
from __future__ import annotations

import pytest
import torch

from kvslim.engine.decode_eviction import DecodeEviction
from kvslim.methods import policy


@pytest.mark.parametrize("prompt", [1, 3, 4])
def test_ring_holds_the_newest_queries_oldest_first(prompt: int) -> None:
    method = policy("rkv(budget=8,window=4)")
    evictor = DecodeEviction(method, num_layers=2, scaling=1.0, rope=None)
    queries = torch.randn(2, 3, 20, 5)  # (L, Hq, steps, D)
    states = [{"budget": torch.ones(1, 1), "rkv.queries": queries[i, None, :, :prompt]} for i in range(2)]
    state = evictor.start(states)
    assert "rkv.queries" not in state.layers[0]  # the ring holds them now
    for t in range(prompt, 20):
        state.push(queries[:, :, t])
        newest = queries[:, :, max(0, t + 1 - method.observed) : t + 1]
        assert torch.equal(state.recent(), newest)
    assert state.steps == 20 - prompt


def test_layers_without_a_budget_let_the_cache_grow() -> None:
    evictor = DecodeEviction(policy("rkv(budget=8)"), num_layers=2, scaling=1.0, rope=None)
    assert evictor.start([{}, {}]) is None
    with pytest.raises(ValueError, match="some layers"):
        evictor.start([{"budget": torch.ones(1, 1), "rkv.queries": torch.zeros(1, 1, 1, 1)}, {}])


def test_query_ring_grows_to_the_methods_limit_in_order() -> None:
    """A method observing every query (expected_attention(history=None)) gets a ring that grows; a bounded one keeps
    its newest ``limit`` queries."""
    from kvslim.engine.decode_eviction import DecodeState

    def run(limit: int, steps: int) -> list[int]:
        prompt = torch.arange(3.0)[None, None, :, None]  # (L=1, Hq=1, 3 queries, D=1)
        width = min(limit, 3 + 2)
        ring = torch.zeros(1, 1, width, 1)
        ring[:, :, :3] = prompt
        state = DecodeState([{}], ring, 3, 3 % width, limit)
        for step in range(steps):
            state.push(torch.full((1, 1, 1), 3.0 + step))
        return state.recent().flatten().int().tolist()

    assert run(1 << 62, 9) == list(range(12))  # grew 5 -> 10 -> 20, nothing lost, oldest first
    assert run(4, 9) == [8, 9, 10, 11]  # bounded: the newest four


def test_accumulated_scores_become_one_tensor_and_the_ring_holds_every_step_since_an_eviction() -> None:
    """H2O's per-token scores leave the layer states for one (L, H, slots) tensor, zero past each layer's kept tokens;
    with interval=5 > window=2 the ring keeps 5 queries: all those the next eviction must add."""
    method = policy("h2o(budget=8,window=2,interval=5)")
    evictor = DecodeEviction(method, num_layers=2, scaling=1.0, rope=None)
    scores = [torch.rand(1, 1, 4), torch.rand(1, 1, 6)]  # layers of other kept lengths
    states = [{"budget": torch.ones(1, 1), "h2o.queries": torch.zeros(1, 3, 2, 5), "h2o": s} for s in scores]
    state = evictor.start(states)
    assert "h2o" not in state.layers[0]
    assert torch.equal(state.tokens["h2o"], torch.stack([torch.cat([scores[0][0], torch.zeros(1, 2)], -1), scores[1][0]]))
    for step in range(7):
        state.push(torch.full((2, 3, 5), float(step)))
    assert state.recent(5)[0, 0, :, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
