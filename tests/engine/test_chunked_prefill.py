"""Chunked prefill: the token budget's order (decode, then chunks, oldest first), the same greedy tokens as whole
prompts for every kind of policy, decoding that goes on beside a long prompt, prefix sharing, and latencies."""
from __future__ import annotations

import pytest
import torch

from kvslim.engine import LLM, SamplingParams, StepFailed
from kvslim.engine.block_manager import BlockManager
from kvslim.engine.compression import Compression
from kvslim.engine.latency import LatencyStats, percentiles
from kvslim.engine.scheduler import Scheduler, Step
from kvslim.engine.sequence import Sequence
from kvslim.methods import policy as build_policy

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


def _prompts(*lengths: int) -> list[list[int]]:
    return [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]


# -- the scheduler alone ----------------------------------------------------------------------------
def _scheduler(spec: str = "full", budget: int = 8, blocks: int = 64) -> Scheduler:
    compression = Compression(build_policy(spec), num_layers=2, scaling=1.0)
    return Scheduler(BlockManager(blocks, 4), compression, max_num_seqs=8, max_prefill_tokens=4096,
                     max_model_len=4096, token_budget=budget, chunkable=compression.chunkable)


def _add(scheduler: Scheduler, n_tokens: int) -> Sequence:
    seq = Sequence(_prompts(n_tokens)[0], SamplingParams(max_tokens=50))  # prompts of one length are the same
    scheduler.add(seq)
    return seq


def _run(step: Step) -> None:
    """What the engine does to the sequences' counts: chunks advance, a finished prompt and a decode add a token."""
    for seq in step.decode:
        seq.kv_slots += 1
        seq.token_ids.append(7)
    for seq, count in step.prefill:
        seq.num_prefilled += count
        if not seq.prefilling:
            seq.kv_slots = seq.prefill_len
            seq.token_ids.append(7)


def test_decode_tokens_come_first_and_chunks_fill_the_rest() -> None:
    scheduler = _scheduler(budget=8)
    short = [_add(scheduler, 3), _add(scheduler, 2)]
    _run(scheduler.schedule())  # both short prompts (5 tokens) in one step
    assert not any(s.prefilling for s in short)
    long = _add(scheduler, 30)
    step = scheduler.schedule()
    assert step.decode == short
    assert step.prefill == [(long, 6)]  # 8 tokens: 2 decode tokens, then a 6-token chunk
    _run(step)
    step = scheduler.schedule()
    assert step.decode == short and step.prefill == [(long, 6)]  # decoding never waits for the long prompt


def test_the_oldest_prompt_gets_the_budget_first_so_every_prompt_finishes() -> None:
    scheduler = _scheduler(budget=10)
    first, second = _add(scheduler, 25), _add(scheduler, 12)
    step = scheduler.schedule()
    assert step.prefill == [(first, 10)]  # the whole budget to the first; the second is not admitted yet
    _run(step)
    _run(scheduler.schedule())  # first: 20 of 25
    step = scheduler.schedule()
    assert step.prefill == [(first, 5), (second, 5)]  # the first's rest, then the second starts
    _run(step)
    step = scheduler.schedule()
    assert step.decode == [first] and step.prefill == [(second, 7)]
    _run(step)
    assert not second.prefilling and scheduler.schedule().decode == [first, second]


def test_a_prompt_token_runs_even_when_decodes_fill_the_budget() -> None:
    scheduler = _scheduler(budget=2)
    decoding = [_add(scheduler, 1), _add(scheduler, 1)]
    _run(scheduler.schedule())
    long = _add(scheduler, 5)
    step = scheduler.schedule()
    assert step.decode == decoding and step.prefill == [(long, 1)]


def test_an_unsplittable_prompt_runs_whole_as_the_steps_only_prefill() -> None:
    scheduler = _scheduler("kivi4", budget=8, blocks=256)
    small, big = _add(scheduler, 5), _add(scheduler, 40)
    assert not scheduler.chunkable
    step = scheduler.schedule()
    assert step.prefill == [(small, 5)]  # 40 tokens do not fit in the 3 left: the big prompt waits
    _run(step)
    step = scheduler.schedule()
    assert step.decode == [small] and step.prefill == [(big, 40)]  # then runs whole, beside the decode


def test_a_prompt_that_fits_in_the_step_runs_whole_and_takes_only_the_kept_blocks() -> None:
    scheduler = _scheduler("snapkv(keep=0.25)", budget=64)
    seq = _add(scheduler, 40)
    assert scheduler.schedule().prefill == [(seq, 40)]
    assert len(seq.block_table) == 3  # the 10 tokens kept, in blocks of 4: compressed before it is stored


def test_a_prompt_the_pool_holds_only_compressed_runs_whole() -> None:
    scheduler = _scheduler("snapkv(keep=0.25)", budget=8, blocks=8)
    seq = Sequence(list(range(1, 61)), SamplingParams(max_tokens=4))  # 15 blocks uncompressed; 4 kept, +1 to decode
    scheduler.add(seq)
    assert scheduler.schedule().prefill == [(seq, 60)]


def test_a_preempted_prefilling_sequence_starts_its_prompt_again() -> None:
    scheduler = _scheduler(budget=4)
    seq = _add(scheduler, 10)
    _run(scheduler.schedule())
    assert seq.num_prefilled == 4
    scheduler.preempt(seq)
    assert (seq.num_prefilled, seq.prefill_len, seq.prefill_queries) == (0, 0, None)
    assert scheduler.schedule().prefill == [(seq, 4)]


def test_a_later_prompt_shares_only_the_blocks_a_chunk_has_written() -> None:
    scheduler = _scheduler(budget=8)
    first = _add(scheduler, 16)
    _run(scheduler.schedule())
    scheduler.preempt(first)  # its blocks keep their prefix hashes, but only 2 of 4 hold their keys
    scheduler.waiting.clear()
    second = _add(scheduler, 16)
    scheduler.schedule()
    assert second.num_cached_tokens == 8


# -- the engine: the same tokens as whole prompts ---------------------------------------------------
@pytest.mark.parametrize("spec", [
    "full",
    "snapkv(keep=0.5,window=16)",  # window 16 > a chunk: its observation window spans chunks
    "kivi4(group=4,residual=8)",  # quantized pages are not chunked: prompts run whole
    "streaming(budget=12,sinks=4)",
    "adakv(keep=0.3,window=4)",  # ragged heads
    "expected_attention(keep=0.25,history=16,future=32)",
    "expected_attention(keep=0.25,future=32)",  # every query of the prompt, kept across chunks; the sinks' left out
    "kvzip(keep=0.5,chunk=8)",  # probes attend to the whole prompt during the last chunk
    "rkv(budget=24)",  # decode-time compression from the state the last chunk leaves
    "h2o(budget=24,window=16)",  # ... and the attention the last 16 prompt queries accumulated, across chunks
    "merge(snapkv,keep=0.5,window=16)",
])
def test_chunked_greedy_tokens_equal_whole_prompts(llama, spec: str) -> None:
    prompts = _prompts(41, 19, 33, 7)
    whole = LLM(llama, policy=spec, kv_memory=0.01, block_size=4).generate(prompts, GREEDY)
    chunked = LLM(llama, policy=spec, kv_memory=0.01, block_size=4, chunked_prefill=True, max_num_batched_tokens=8)
    outs = chunked.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in whole]
    assert chunked.blocks.num_free == chunked.blocks.num_blocks


def test_compression_still_lets_a_prompt_larger_than_the_pool_run(llama) -> None:
    probe = LLM(llama, kv_memory=0.001, block_size=4)
    llm = LLM(llama, policy="snapkv(keep=0.25,window=4)", kv_memory=8 * probe.block_bytes / 2**30, block_size=4,
              chunked_prefill=True, max_num_batched_tokens=8)
    out = llm.generate([_prompts(60)[0]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.stats["peak_kv_blocks"] <= 5 < out.stats["full_kv_bytes"] // llm.block_bytes


@pytest.mark.parametrize("spec", ["full", "snapkv(keep=0.5,window=8)"])
def test_preemption_in_the_middle_of_a_prompt_gives_the_same_tokens(llama, spec: str) -> None:
    """Three sequences decode while a 60-token prompt is prefilled; when they need blocks, it is the newest and is
    preempted part-way (and prefilled again later)."""
    lengths = {5: 30, 6: 30, 7: 30, 60: 4}  # prompt tokens: output tokens
    requests = [(p, SamplingParams(max_tokens=lengths[len(p)], ignore_eos=True)) for p in _prompts(*lengths)]
    roomy = LLM(llama, policy=spec, kv_memory=0.01, block_size=4)
    probe = LLM(llama, kv_memory=0.001, block_size=4)
    tight = LLM(llama, policy=spec, kv_memory=27 * probe.block_bytes / 2**30, block_size=4, chunked_prefill=True,
                max_num_batched_tokens=8)
    preempted_while_prefilling = []
    preempt = tight.scheduler.preempt

    def watch(seq: Sequence) -> None:
        preempted_while_prefilling.append(seq.prefilling)
        preempt(seq)

    tight.scheduler.preempt = watch
    outputs = []
    for llm in (roomy, tight):
        ids = [llm.add_request(prompt, params) for prompt, params in requests]
        while llm.has_unfinished:
            llm.step()
        outputs.append([llm.finished.pop(i).token_ids for i in ids])
    assert outputs[0] == outputs[1]
    assert any(preempted_while_prefilling)
    assert tight.blocks.num_free == tight.blocks.num_blocks


def test_a_decoding_sequence_makes_progress_while_a_long_prompt_is_prefilled(llama) -> None:
    long_output = SamplingParams(max_tokens=30, ignore_eos=True)
    llm = LLM(llama, kv_memory=0.01, block_size=4, chunked_prefill=True, max_num_batched_tokens=8)
    short = llm.add_request(_prompts(5)[0], long_output)
    llm.step()
    long = llm.add_request(_prompts(60)[0], GREEDY)
    long_seq = llm.requests[long][0]
    steps = 0
    while long_seq.prefilling or not long_seq.num_prefilled:
        produced = {seq.request_id for seq, _ in llm.step()}
        assert short in produced  # a token of the short request every step
        steps += 1
    assert steps >= 60 // 7  # the prompt took several steps (7 tokens a step beside one decode token)
    while llm.has_unfinished:
        llm.step()
    alone = LLM(llama, kv_memory=0.01, block_size=4).generate(_prompts(5), long_output)
    assert llm.finished[short].token_ids == alone[0].token_ids


def test_prefix_sharing_finds_only_blocks_whose_keys_are_written(llama) -> None:
    shared = _prompts(24)[0]
    prompts = [shared + [5, 6, 7], shared + [9]]
    fresh = [LLM(llama, kv_memory=0.01, block_size=4).generate([p], GREEDY)[0].token_ids for p in prompts]
    llm = LLM(llama, kv_memory=0.01, block_size=4, chunked_prefill=True, max_num_batched_tokens=8)
    together = llm.generate(prompts, GREEDY)  # the second starts in the step of the first's last chunk
    assert [o.token_ids for o in together] == fresh
    assert together[1].stats["cached_prompt_tokens"] == 24  # the first's blocks, written earlier in that step
    later = llm.generate([prompts[1]], GREEDY)[0]  # now the prefix is written: it is shared
    assert later.stats["cached_prompt_tokens"] == 24
    assert later.token_ids == fresh[1]


def test_a_failed_chunk_leaves_no_block_to_share(llama, monkeypatch) -> None:
    prompt = _prompts(24)[0]
    llm = LLM(llama, kv_memory=0.01, block_size=4, chunked_prefill=True, max_num_batched_tokens=8)
    llm.add_request(prompt, GREEDY)
    monkeypatch.setattr(llm.runner, "prefill", lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(StepFailed):
        llm.step()  # its first two blocks were registered for this chunk, which wrote nothing
    monkeypatch.undo()
    again = llm.generate([prompt], GREEDY)[0]
    assert again.stats["cached_prompt_tokens"] == 0
    assert again.token_ids == LLM(llama, kv_memory=0.01, block_size=4).generate([prompt], GREEDY)[0].token_ids


def test_budget_options_are_checked(llama) -> None:
    with pytest.raises(ValueError, match="pass chunked_prefill=True"):
        LLM(llama, kv_memory=0.01, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="max_num_batched_tokens=0"):
        LLM(llama, kv_memory=0.01, chunked_prefill=True, max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        LLM(llama, kv_memory=0.01, chunked_prefill=True, tensor_parallel_size=2)


# -- latencies --------------------------------------------------------------------------------------
def test_percentiles_interpolate_linearly() -> None:
    assert percentiles([4.0, 1.0, 3.0, 2.0], (0.5, 0.99, 1.0)) == pytest.approx([2.5, 3.97, 4.0])
    assert percentiles([]) == [None, None]


def test_latency_stats_count_one_ttft_per_request_and_every_gap() -> None:
    stats = LatencyStats()
    stats.add(10.0, [[10.5, 10.7, 11.0], [10.5, 10.6]])  # two completions of one request
    assert list(stats.ttft) == pytest.approx([0.5])
    assert sorted(stats.itl) == pytest.approx([0.1, 0.2, 0.3])


def test_engine_metrics_report_ttft_and_itl_percentiles(llama) -> None:
    llm = LLM(llama, kv_memory=0.01, block_size=4, chunked_prefill=True, max_num_batched_tokens=16)
    assert llm.metrics().latency == {"ttft_p50_s": None, "ttft_p99_s": None, "itl_p50_s": None, "itl_p99_s": None}
    outs = llm.generate(_prompts(30, 9), GREEDY)
    assert all(0 < o.stats["itl_p50_s"] <= o.stats["itl_p99_s"] for o in outs)
    latency = llm.metrics().latency
    assert len(llm.latency.ttft) == 2 and len(llm.latency.itl) == 2 * (GREEDY.max_tokens - 1)
    assert 0 < latency["ttft_p50_s"] <= latency["ttft_p99_s"]
    assert 0 < latency["itl_p50_s"] <= latency["itl_p99_s"]


def test_forked_completions_start_after_the_last_chunk(llama) -> None:
    params = SamplingParams(max_tokens=8, n=2, temperature=0.8, seed=3)
    prompts = _prompts(30, 13)
    whole = LLM(llama, kv_memory=0.01, block_size=4).generate(prompts, params)
    chunked = LLM(llama, kv_memory=0.01, block_size=4, chunked_prefill=True, max_num_batched_tokens=8)
    outs = chunked.generate(prompts, params)
    assert [[c.token_ids for c in o.completions] for o in outs] == [[c.token_ids for c in o.completions] for o in whole]
    assert chunked.blocks.num_free == chunked.blocks.num_blocks
