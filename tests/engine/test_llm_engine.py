"""Continuous batching, preemption, prefix sharing, forks and request errors, end to end on a tiny model."""
from __future__ import annotations

import pytest
import torch

from kvslim.engine import LLM, RequestTooLarge, SamplingParams, StepFailed

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def _prompts(*lengths: int) -> list[list[int]]:
    return [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]


def _small_pool(model, blocks: int, **kwargs) -> LLM:
    probe = LLM(model, kv_memory=0.001, block_size=4)
    return LLM(model, kv_memory=blocks * probe.block_bytes / 2**30, block_size=4, **kwargs)


def test_preemption_by_recompute_gives_the_same_tokens(llama) -> None:
    prompts = _prompts(9, 14, 11, 7)
    roomy = LLM(llama, kv_memory=0.01, block_size=4).generate(prompts, GREEDY)
    tight = _small_pool(llama, 12)  # 48 slots for 4 sequences that end at 19-26 tokens each
    outs = tight.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert tight.scheduler.preemptions > 0
    assert tight.blocks.num_free == tight.blocks.num_blocks


def test_requests_join_between_decode_steps(llama) -> None:
    llm = LLM(llama, kv_memory=0.01, block_size=4)
    first = llm.add_request(_prompts(10)[0], GREEDY)
    for _ in range(4):
        llm.step()
    second = llm.add_request(_prompts(6)[0], GREEDY)
    llm.step()
    assert llm.metrics().running == 2
    while llm.has_unfinished:
        llm.step()
    alone = LLM(llama, kv_memory=0.01, block_size=4).generate(_prompts(10, 6), GREEDY)
    assert [llm.finished[first].token_ids, llm.finished[second].token_ids] == [o.token_ids for o in alone]


def test_identical_prefixes_share_blocks(llama) -> None:
    shared = _prompts(16)[0]
    prompts = [shared + [5, 6, 7], shared + [9]]
    llm = LLM(llama, kv_memory=0.01, block_size=4)
    outs = llm.generate(prompts, GREEDY)
    assert outs[1].stats["cached_prompt_tokens"] == 16
    fresh = [LLM(llama, kv_memory=0.01, block_size=4).generate([p], GREEDY)[0].token_ids for p in prompts]
    assert [o.token_ids for o in outs] == fresh
    again = llm.generate([shared], GREEDY)[0]  # whole prompt cached: only the last token is recomputed
    assert again.stats["cached_prompt_tokens"] == 16
    assert again.token_ids == LLM(llama, kv_memory=0.01, block_size=4).generate([shared], GREEDY)[0].token_ids


def test_forked_completions_copy_on_write(llama) -> None:
    llm = LLM(llama, kv_memory=0.01, block_size=4)
    prompt = _prompts(10)[0]  # ends mid-block: the shared last block is copied on the first write
    out = llm.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True, n=3))[0]
    single = LLM(llama, kv_memory=0.01, block_size=4).generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))
    assert [c.token_ids for c in out.completions] == [single[0].token_ids] * 3
    sampled = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=1, ignore_eos=True))[0]
    assert len({tuple(c.token_ids) for c in sampled.completions}) > 1
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_oversize_request_is_refused_clearly(llama) -> None:
    llm = _small_pool(llama, 4)
    with pytest.raises(RequestTooLarge, match="needs 6 KV blocks .* whole pool has 4"):
        llm.generate([_prompts(20)[0]], SamplingParams(max_tokens=4))


def test_compression_lets_a_long_prompt_fit(llama) -> None:
    """A prompt larger than the pool runs when the method keeps a quarter of it."""
    llm = _small_pool(llama, 8, policy="snapkv(keep=0.25,window=4)")
    out = llm.generate([_prompts(60)[0]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.stats["peak_kv_blocks"] <= 5 < out.stats["full_kv_bytes"] // llm.block_bytes


def test_stop_strings_and_eos(llama) -> None:
    class Bytes:
        eos_token_id = 0

        def encode(self, text: str) -> list[int]:
            return list(text.encode())

        def decode(self, ids: list[int], **_: object) -> str:
            return bytes(ids).decode("latin-1")

    llm = LLM(llama, tokenizer=Bytes(), kv_memory=0.01, block_size=4)
    full = llm.generate(["hello"], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    stop = full.text[3:5]
    cut = llm.generate(["hello"], SamplingParams(max_tokens=8, stop=[stop], ignore_eos=True))[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.completions[0].finish_reason == "stop"


@pytest.mark.parametrize(("prompt", "params", "message"), [
    ([-1, 5], SamplingParams(), r"prompt token -1 \(position 0\) is not in the model's vocabulary"),
    ([7, 10**9], SamplingParams(), r"prompt token 1000000000 \(position 1\) .*: token ids are 0\.\.255"),
    ([], SamplingParams(), "empty prompt"),
    ([7] * 4, SamplingParams(n=5), "n=5 completions .* at most 4 sequences at once"),
])
def test_requests_that_would_fail_inside_a_step_are_refused_when_added(llama, prompt, params, message) -> None:
    llm = LLM(llama, kv_memory=0.01, block_size=4, max_num_seqs=4)
    with pytest.raises(ValueError, match=message):
        llm.add_request(prompt, params)
    assert not llm.has_unfinished


@pytest.mark.parametrize(("values", "message"), [
    ({"temperature": float("nan")}, "temperature=nan must be a finite number"),
    ({"temperature": float("inf")}, "temperature=inf must be a finite number"),
    ({"temperature": 1e-40}, "too small to sample with: use 0 for greedy or at least 0.01"),
    ({"top_p": float("nan")}, "top_p=nan must be in"),
    ({"top_k": -1}, "top_k=-1 must be >= 0"),
    ({"seed": 2**70}, "does not fit in 64 bits"),
])
def test_sampling_values_that_break_sampling_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**values)


def test_empty_stop_strings_are_dropped() -> None:
    assert SamplingParams(stop=["", "END", ""]).stop == ["END"] and SamplingParams(stop="").stop == []


def test_top_k_one_is_greedy(llama) -> None:
    prompt = _prompts(9)[0]
    greedy = LLM(llama, kv_memory=0.01, block_size=4).generate([prompt], GREEDY)[0].token_ids
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.5, top_k=1, seed=3)
    assert LLM(llama, kv_memory=0.01, block_size=4).generate([prompt], params)[0].token_ids == greedy


def test_a_failing_step_drops_only_its_requests(llama, monkeypatch) -> None:
    """A step that raises frees the blocks of the requests it ran; the others go on as if nothing happened."""
    first, second = _prompts(10, 6)
    llm = LLM(llama, kv_memory=0.01, block_size=4, max_prefill_tokens=10)  # one prefill per step
    kept = llm.add_request(first, GREEDY)
    llm.step()
    lost = llm.add_request(second, SamplingParams(max_tokens=12, ignore_eos=True, n=2))
    monkeypatch.setattr(llm.runner, "prefill", lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(StepFailed, match="RuntimeError: boom") as failure:
        llm.step()
    assert failure.value.request_ids == [lost] and lost not in llm.requests
    monkeypatch.undo()
    while llm.has_unfinished:
        llm.step()
    alone = LLM(llama, kv_memory=0.01, block_size=4).generate([first], GREEDY)[0].token_ids
    assert llm.finished.pop(kept).token_ids == alone and not llm.finished
    assert llm.blocks.num_free == llm.blocks.num_blocks
