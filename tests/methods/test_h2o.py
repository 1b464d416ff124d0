"""H2O's accumulated attention: decoding steps folded in together (the paged engine, on the steps that evict) give
the sums kvslim.Cache makes one step at a time."""
from __future__ import annotations

import torch
from torch import Tensor

from kvslim.cache.layer import LayerKV
from kvslim.methods import Observation, policy


def _layer(keys: Tensor, scores: Tensor) -> LayerKV:
    layer = LayerKV(0)
    layer.append(keys, keys.flip(-1))
    layer.state["h2o"] = scores.clone()
    return layer


def test_steps_attended_together_equal_steps_attended_one_by_one() -> None:
    gen = torch.Generator().manual_seed(0)
    h2o = policy("h2o(budget=8)")
    heads, group, dim, prompt, steps = 2, 3, 8, 10, 4
    keys = torch.randn(1, heads, prompt + steps, dim, generator=gen)
    queries = torch.randn(1, heads * group, steps, dim, generator=gen)
    scores = torch.rand(1, heads, prompt, generator=gen) * 5  # what the prefill accumulated

    one_by_one = _layer(keys[:, :, :prompt], scores)
    for step in range(steps):
        one_by_one.append(keys[:, :, prompt + step, None], keys[:, :, prompt + step, None].flip(-1))
        h2o.attended(Observation(one_by_one, 1, queries[:, :, step, None], 0.3, "decode"), 1)
        assert one_by_one.state["h2o"].shape[-1] == prompt + step + 1  # the new token's column, scored already

    together = _layer(keys, torch.nn.functional.pad(scores, (0, steps)))  # the engine: pages hold every step's token
    h2o.attended(Observation(together, 1, queries, 0.3, "decode"), steps)

    torch.testing.assert_close(together.state["h2o"], one_by_one.state["h2o"], rtol=1e-6, atol=1e-7)
    # each step's query attends to its own token and the earlier ones only: the newest token got one query's votes
    newest = Observation(together, 1, queries[:, :, -1:], 0.3, "decode").attention(1)[:, :, 0, -1]
    torch.testing.assert_close(together.state["h2o"][..., -1], newest)
