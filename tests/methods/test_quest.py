"""Quest under kvslim.Cache: page extrema kept as tokens arrive, each step attends over the selected pages only,
a budget covering the context is the full cache, and the bytes held and read are reported."""
from __future__ import annotations

import math

import pytest
import torch

import kvslim
from kvslim.cache.quest import QuestSegment, page_extrema
from kvslim.cache.segments import DenseSegment, partial_attention
from kvslim.methods.quest import Quest, step_read_bytes
from kvslim.models import load_config
from kvslim.shape import KVShape


@torch.inference_mode()
def _greedy(model, spec: str, prompt: torch.Tensor, n: int) -> tuple[list[int], kvslim.Cache]:
    cache = kvslim.Cache(kvslim.policy(spec), model.config)
    ids, out = prompt, []
    for _ in range(n):
        logits = model(ids, past_key_values=cache, use_cache=True).logits[0, -1]
        out.append(int(logits.argmax()))
        ids = torch.tensor([[out[-1]]])
    return out, cache


def test_budget_covering_the_context_equals_full(model, prompt) -> None:
    assert _greedy(model, "quest(budget=4096)", prompt, 20)[0] == _greedy(model, "full", prompt, 20)[0]


def test_small_budget_reads_fewer_pages_and_changes_the_output(llama) -> None:
    prompt = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(3))
    full, _ = _greedy(llama, "full", prompt, 30)
    sparse, cache = _greedy(llama, "quest(budget=64)", prompt, 30)
    assert sparse != full
    (segment,) = cache.layers[0].segments
    assert isinstance(segment, QuestSegment) and segment.lengths.tolist() == [[329, 329]]  # every token kept


def test_extrema_follow_every_appended_token(llama, prompt) -> None:
    _, cache = _greedy(llama, "quest(budget=32,page=16)", prompt, 21)  # 96 + 20 tokens: a partial last page
    for layer in cache.layers:
        (segment,) = layer.segments
        keys, _, valid = DenseSegment.dense(segment)
        low, high = page_extrema(keys, valid, 16)
        assert segment.kmin.shape[2] == math.ceil(116 / 16)
        torch.testing.assert_close(segment.kmin, low, rtol=0, atol=0)
        torch.testing.assert_close(segment.kmax, high, rtol=0, atol=0)
        torch.testing.assert_close(low[:, :, 0], keys[:, :, :16].amin(2), rtol=0, atol=0)


def test_segment_attends_exactly_over_the_pages_with_the_highest_bounds() -> None:
    """Ragged rows; per KV head, the pages read are the sink, the newest and the best by a brute-force bound."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([[70, 37], [50, 64]])
    dense = DenseSegment(torch.randn(int(lengths.sum()), 8, generator=gen),
                         torch.randn(int(lengths.sum()), 8, generator=gen), lengths)
    segment = QuestSegment.build(dense, page=16, top=3, sinks=1)
    query = torch.randn(2, 4, 1, 8, generator=gen)
    keys, values, valid = dense.dense()
    out, lse = segment.attend(query, valid[:, :, None, :], 0.3)
    for b in range(2):
        for h in range(2):
            n = int(lengths[b, h])
            q = query[b, 2 * h : 2 * h + 2, 0]
            pages = range(n // 16 + 1)
            bound = {p: max(float(torch.maximum(q[g] * keys[b, h, p * 16 : min(n, p * 16 + 16)].amin(0),
                                                q[g] * keys[b, h, p * 16 : min(n, p * 16 + 16)].amax(0)).sum())
                            for g in range(2)) for p in pages if p * 16 < n}
            best = max((p for p in bound if p not in (0, n // 16)), key=bound.get)
            rows = [t for p in sorted({0, n // 16, best}) for t in range(p * 16, min(n, p * 16 + 16))]
            want, want_lse = partial_attention(query[b : b + 1, 2 * h : 2 * h + 2], keys[b : b + 1, h : h + 1, rows],
                                               values[b : b + 1, h : h + 1, rows],
                                               torch.ones(1, 1, 1, len(rows), dtype=torch.bool), 0.3)
            torch.testing.assert_close(out[b, 2 * h : 2 * h + 2], want[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lse[b, 2 * h : 2 * h + 2], want_lse[0], rtol=1e-5, atol=1e-6)


def test_memory_is_not_saved_and_bandwidth_is() -> None:
    shape = KVShape.from_config(load_config("llama-3.1-8b"))
    quest = kvslim.policy("quest(budget=2048,page=16)")
    full = kvslim.policy("full")
    assert quest.expected_bytes(shape, 32768) == full.expected_bytes(shape, 32768) * 17 // 16  # + extrema: 2 / 32
    assert step_read_bytes(shape, 32768) == full.expected_bytes(shape, 32768)
    read = step_read_bytes(shape, 32768, 2048, 16)
    assert read == full.expected_bytes(shape, 32768) * (2048 + 2048) // 32768  # extrema of 2048 pages + 2048 tokens
    assert step_read_bytes(shape, 100, 2048, 16) == full.expected_bytes(shape, 100) + 7 * 2 * shape.bytes_per_token // 2


def test_cache_reports_the_extrema_as_held_bytes(llama, prompt) -> None:
    _, cache = _greedy(llama, "quest(budget=32)", prompt, 1)
    keys = sum(layer.segments[0].keys.numel() * 4 for layer in cache.layers)
    extrema = 2 * llama.config.num_hidden_layers * 2 * math.ceil(96 / 16) * 16 * 4  # 2 KV heads, head_dim 16
    assert cache.nbytes() == 2 * keys + extrema


@pytest.mark.parametrize(("spec", "message"), [
    ("quest(page=12)", "power of two"),
    ("quest(budget=16,page=16)", "at least 32"),
    ("quest(sink_pages=-1)", "sink_pages"),
    ("quest+kivi4", "must come last"),
])
def test_invalid_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kvslim.policy(spec)


def test_listed_by_kvslim_methods() -> None:
    (entry,) = [m for m in kvslim.methods.describe() if m["name"] == "quest"]
    assert "bandwidth" in entry["summary"]
    assert [p["name"] for p in entry["parameters"]] == ["budget", "page", "sink_pages"]
    assert isinstance(kvslim.policy("snapkv(keep=0.5)+quest(budget=64)").parts[-1], Quest)


@pytest.mark.parametrize("suffix", [False, True])
def test_a_padded_batch_answers_as_each_sequence_alone(llama, suffix: bool) -> None:
    """Left padding is dropped, so each row's pages start at its own first token; with a question appended after
    the context (query-agnostic), the question is attended in full and joins the pages at the first step."""
    gen = torch.Generator().manual_seed(5)
    contexts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (70, 41, 90)]
    questions = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (7, 2, 5)] if suffix else None
    kw = {"max_new_tokens": 12, "suffix_ids": questions}
    batch, cache, _ = kvslim.generate_ids(llama, contexts, "quest(budget=32)", **kw)
    for i, context in enumerate(contexts):
        alone, _, _ = kvslim.generate_ids(llama, [context], "quest(budget=32)", max_new_tokens=12,
                                          suffix_ids=None if questions is None else [questions[i]])
        assert batch[i] == alone[0]
    full, _, _ = kvslim.generate_ids(llama, contexts, "full", **kw)
    assert batch != full
    assert cache.tokens_per_sequence() == [2 * 2 * (len(c) + len(q) + 11)
                                           for c, q in zip(contexts, questions or [[]] * 3)]
