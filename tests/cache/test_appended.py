"""Query-agnostic generation: a context compressed first, then a question appended uncompressed
(``Cache.appended`` through ``generate_ids(suffix_ids=...)``)."""
from __future__ import annotations

import pytest
import torch

import kvslim
from kvslim.cache import Cache
from kvslim.models import tiny_model


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_full_cache_gives_the_same_answer_either_way(impl):
    """With nothing evicted, context-then-question is the same computation as one prompt."""
    model = tiny_model("llama", "gqa", seed=0, attn_implementation=impl)
    contexts, questions = _prompts(1, (60, 41, 75)), _prompts(2, (9, 3, 6))
    whole, _, _ = kvslim.generate_ids(model, [c + q for c, q in zip(contexts, questions)], "full", max_new_tokens=10)
    split, cache, _ = kvslim.generate_ids(model, contexts, "full", max_new_tokens=10, suffix_ids=questions)
    assert split == whole
    assert cache.tokens_seen() == [len(c) + len(q) + 9 for c, q in zip(contexts, questions)]


@pytest.mark.parametrize("name", ["snapkv", "streaming", "h2o", "knorm", "snapkv+kivi4", "kcache"])
def test_question_is_kept_whole_and_batches_match_one_by_one(name):
    """The policy compresses the context only: every question token is held after the append, padding of
    a batch of questions is dropped, and a batch answers as each sequence alone does."""
    model = tiny_model("llama", "gqa", seed=0)
    contexts, questions = _prompts(3, (64, 40, 52)), _prompts(4, (7, 2, 5))
    kw = {"fraction": 0.25} if name == "kcache" else {"keep": 0.25, "window": 8} if name in ("snapkv", "h2o") \
        else {"keep": 0.25}
    batch, cache, timing = kvslim.generate_ids(model, contexts, name, max_new_tokens=6, suffix_ids=questions, **kw)
    for i, (c, q) in enumerate(zip(contexts, questions)):
        alone, _, _ = kvslim.generate_ids(model, [c], name, max_new_tokens=6, suffix_ids=[q], **kw)
        assert batch[i] == alone[0]
    if name in ("snapkv", "knorm"):  # select-once methods: the kept context plus the whole question
        layers, heads, per_token = 2, 2, 2 * 16 * 4
        kept = [-(-len(c) // 4) + len(q) for c, q in zip(contexts, questions)]
        assert timing["kv_bytes_prefill"] == [layers * heads * k * per_token for k in kept]
    if name in ("streaming", "h2o"):  # decode-time methods hold the kept context plus the question, step after step
        held = [2 * 2 * (-(-len(c) // 4) + len(q)) for c, q in zip(contexts, questions)]
        assert cache.tokens_per_sequence() == held


@pytest.mark.parametrize("prune_decoded", [True, False])
def test_think_keeps_the_question_whole_while_decoding(prune_decoded):
    """ThinK prunes the context's key channels; the question appended after it stays held with whole keys on every
    decoding step, while each decoded key turns thin after its own step (prune_decoded) or stays whole. Once, the
    first decoding step took the question's first token for its own and dropped the rest of the question."""
    model = tiny_model("llama", "gqa", seed=0)
    contexts, questions = _prompts(3, (64, 40, 52)), _prompts(4, (7, 2, 5))
    spec, steps = f"think(ratio=0.5,prune_decoded={str(prune_decoded).lower()})", 5
    batch, _, _ = kvslim.generate_ids(model, contexts, spec, max_new_tokens=steps + 1, suffix_ids=questions)
    for i, (c, q) in enumerate(zip(contexts, questions)):
        alone, cache, _ = kvslim.generate_ids(model, [c], spec, max_new_tokens=steps + 1, suffix_ids=[q])
        assert batch[i] == alone[0]
        layers, heads, element = 2, 2, 4
        assert cache.tokens_per_sequence() == [layers * heads * (len(c) + len(q) + steps)]
        decoded_key = 8 if prune_decoded else 16  # of 16 channels
        per_head = len(c) * (8 + 16) + len(q) * (16 + 16) + steps * (decoded_key + 16)
        index = layers * heads * 8 * 2  # the kept channels, int16
        assert cache.nbytes() == layers * heads * per_head * element + index


def test_question_does_not_vote_for_the_context():
    """SnapKV's window is the end of the context, not the question: what it keeps of the context is the
    same whatever question follows."""
    model = tiny_model("llama", "gqa", seed=0)
    context = _prompts(5, (80,))[0]
    held = []
    for question in _prompts(6, (8,)) + _prompts(7, (8,)):
        _, cache, _ = kvslim.generate_ids(model, [context], "snapkv", max_new_tokens=1, suffix_ids=[question],
                                          keep=0.25, window=8)
        keys, _, valid = cache.layers[1].dense(torch.float32)
        assert bool(valid.all()) and keys.shape[2] == 20 + 8  # keep 0.25 of 80, then the question
        held.append(keys[:, :, :20])
    assert torch.equal(held[0], held[1])


def test_appending_to_an_empty_cache_is_refused():
    model = tiny_model("llama", "gqa", seed=0)
    cache = Cache("full", model.config)
    with pytest.raises(ValueError, match="run the context through the cache first"):
        with cache.appended():
            pass
    with pytest.raises(ValueError, match="one non-empty list"):
        kvslim.generate_ids(model, [[5, 6, 7]], "full", suffix_ids=[[]])


def test_sliding_window_layers_append_one_length_and_refuse_padding():
    """Mistral with a 16-token window: a question appended alone equals one prompt; a padded batch of
    questions is refused (the window's slot records do not follow dropped padding yet)."""
    from transformers import AutoModelForCausalLM

    from kvslim.models import tiny_config

    config = tiny_config("mistral")
    config.sliding_window = 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    contexts, questions = _prompts(8, (40, 27)), _prompts(9, (6, 2))
    for c, q in zip(contexts, questions):
        whole, _, _ = kvslim.generate_ids(model, [c + q], "full", max_new_tokens=5)
        split, _, _ = kvslim.generate_ids(model, [c], "full", max_new_tokens=5, suffix_ids=[q])
        assert split == whole
    with pytest.raises(ValueError, match="sliding-window layers"):
        kvslim.generate_ids(model, contexts, "full", max_new_tokens=5, suffix_ids=questions)
