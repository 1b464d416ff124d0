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
