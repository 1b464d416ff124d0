"""Observation.attention groups query heads per KV head without repeating keys: it must equal the plain reference."""
from __future__ import annotations

import pytest
import torch

from kvslim.cache.layer import LayerKV
from kvslim.cache.segments import DenseSegment
from kvslim.methods import Observation


def reference_attention(obs: Observation, window: int) -> torch.Tensor:
    """The straightforward computation: every KV head's keys and mask repeated for each of its query heads."""
    w = min(window, obs.q_len)
    keys = obs.keys.float().repeat_interleave(obs.group, dim=1)
    logits = obs.queries[:, :, -w:].float() @ keys.transpose(-1, -2) * obs.scaling
    if obs.softcap is not None:
        logits = torch.tanh(logits / obs.softcap) * obs.softcap
    logits = logits.masked_fill(~obs.visible(w).repeat_interleave(obs.group, dim=1), float("-inf"))
    probs = logits.softmax(-1).nan_to_num(0.0)
    batch, q_heads = probs.shape[:2]
    return probs.view(batch, q_heads // obs.group, obs.group, w, -1).mean(2)


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_grouped_attention_matches_repeated_keys(window: int, softcap: float | None) -> None:
    """GQA groups of 7 (14 query heads over 2 KV heads), rows of different lengths (padding columns) and a window
    wider than one row holds, so some queries see nothing: a wrong pairing of query heads, window rows or mask
    rows with KV heads changes the result."""
    torch.manual_seed(0)
    batch, heads, group, length, dim = 3, 2, 7, 11, 8
    keys, values = torch.randn(batch, heads, length, dim), torch.randn(batch, heads, length, dim)
    lengths = torch.tensor([[11, 6], [9, 11], [2, 4]])
    valid = torch.arange(length) < lengths[..., None]
    layer = LayerKV(0)
    layer.replace([DenseSegment.from_padded(keys, values, valid)])
    queries = torch.randn(batch, heads * group, 5, dim) * 3
    obs = Observation(layer, 1, queries, dim ** -0.5, "decode", softcap=softcap)
    got = obs.attention(window)
    expected = reference_attention(obs, window)
    assert got.shape == (batch, heads, min(window, 5), length)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got[~valid[:, :, None].expand_as(got)] == 0).all()  # padding gets no attention
    if window == 8:  # the row holding 2 tokens: its oldest window queries' own tokens are gone, they vote nothing
        assert got[2, 0, 0].sum() == 0 and got[2, 0, -1].sum() > 0
