"""A request's suffix is prefilled uncompressed after its compressed prompt: the engine's query-agnostic protocol,
token for token what ``kvslim.Cache.appended`` (``generate_ids(suffix_ids=...)``) gives."""
from __future__ import annotations

import pytest
import torch

import kvslim
from kvslim.engine import LLM, SamplingParams

CONTEXTS = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (64, 45, 77)]
QUESTIONS = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(100 + n)).tolist() for n in (7, 3, 12)]


@pytest.mark.parametrize("spec", [
    "full",  # nothing evicted: one prompt
    "snapkv(keep=0.25,window=4)",
    "knorm(keep=0.3)",
    "pyramidkv(keep=0.3,window=4)",  # ragged across layers
    "adakv(keep=0.3,window=4)",  # ragged across heads: the suffix lands after each head's own slots
    "streaming(keep=0.25,sinks=2)",  # the window holds the kept context plus the suffix, then slides
    "tova(keep=0.4)",  # decode-time scorer: its budget is widened by the suffix
    "h2o(keep=0.4,window=2)",  # ... and its accumulated scores start at zero for the suffix, as the cache's do
    "merge(snapkv,keep=0.25,window=4)",  # the context's evicted values folded into its kept tokens
    "kvzip(keep=0.25,chunk=16)",  # probes over the context only
])
def test_suffix_matches_cache_appended(llama, spec: str) -> None:
    llm = LLM(llama, policy=spec, kv_memory=0.01, block_size=4)
    outs = llm.generate(CONTEXTS, SamplingParams(max_tokens=20, ignore_eos=True), suffixes=QUESTIONS)
    for context, question, out in zip(CONTEXTS, QUESTIONS, outs):
        hf, _, _ = kvslim.generate_ids(llama, [context], spec, max_new_tokens=20, suffix_ids=[question])
        assert out.token_ids == hf[0]
        assert out.prompt_token_ids == context + question
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_suffix_is_held_whole_beside_the_kept_context(llama) -> None:
    """SnapKV keeps a quarter of the context and every suffix token; without the suffix apart (one prompt) it keeps a
    quarter of both, and answers differently."""
    llm = LLM(llama, policy="snapkv(keep=0.25,window=4)", kv_memory=0.01, block_size=4)
    rid = llm.add_request(CONTEXTS[0], SamplingParams(max_tokens=1), suffix=QUESTIONS[2])
    llm.step()  # the prefill: the first token is sampled, and the request (max_tokens=1) is done
    seq = llm.finished[rid]
    assert seq.stats["peak_kv_blocks"] == -(-(16 + 12) // 4)  # ceil(64 / 4) kept + 12 suffix tokens, in blocks of 4
    whole = llm.generate([CONTEXTS[0] + QUESTIONS[2]], SamplingParams(max_tokens=1))[0]
    assert whole.stats["peak_kv_blocks"] == -(-19 // 4)  # ceil(76 / 4): the question was compressed too


def test_suffix_with_a_storage_format_is_refused(llama) -> None:
    llm = LLM(llama, policy="snapkv(keep=0.25)+int8", kv_memory=0.01, block_size=4)
    with pytest.raises(ValueError, match="model-dtype pages only"):
        llm.add_request(CONTEXTS[0], SamplingParams(max_tokens=4), suffix=QUESTIONS[0])
    with pytest.raises(ValueError, match="one suffix per prompt"):
        LLM(llama, policy="snapkv(keep=0.25)", kv_memory=0.01).generate(CONTEXTS, suffixes=QUESTIONS[:1])
    with pytest.raises(ValueError, match="empty prompt"):
        LLM(llama, policy="snapkv(keep=0.25)", kv_memory=0.01).add_request(CONTEXTS[0], SamplingParams(), suffix=[])


def test_stop_token_ids_end_a_completion(llama) -> None:
    llm = LLM(llama, kv_memory=0.01)
    free = llm.generate([CONTEXTS[0]], SamplingParams(max_tokens=8))[0].token_ids
    stopped = llm.generate([CONTEXTS[0]], SamplingParams(max_tokens=8, stop_token_ids=[free[2]]))[0]
    assert stopped.token_ids == free[:free.index(free[2])]
    assert stopped.completions[0].finish_reason == "stop"


def test_a_preempted_suffix_request_resumes_where_it_was(llama) -> None:
    """Preemption by recompute compresses the context again (the same tokens kept) and appends the suffix and the
    output so far uncompressed: the answer is the one an unpreempted request gives."""
    spec = "snapkv(keep=0.25,window=4)"
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # K and V x layers x block of 4 x KV heads x head dim x float32
    llm = LLM(llama, policy=spec, kv_memory=22 * block_bytes / 2**30, block_size=4)
    outs = llm.generate(CONTEXTS, SamplingParams(max_tokens=20, ignore_eos=True), suffixes=QUESTIONS)
    assert llm.scheduler.preemptions > 0
    for context, question, out in zip(CONTEXTS, QUESTIONS, outs):
        hf, _, _ = kvslim.generate_ids(llama, [context], spec, max_new_tokens=20, suffix_ids=[question])
        assert out.token_ids == hf[0]
