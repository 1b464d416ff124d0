"""Length-aware admission: reserving the expected output growth preempts less and changes no token."""
from __future__ import annotations

import pytest
import torch

from kvslim.engine import LLM, SamplingParams
from kvslim.engine.admission import OutputLengths, block_cap

LONG = SamplingParams(max_tokens=48, ignore_eos=True)


def _prompts(*lengths: int) -> list[list[int]]:
    return [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]


def _pool(model, blocks: int, **kwargs) -> LLM:
    probe = LLM(model, kv_memory=0.001, block_size=4, **{k: v for k, v in kwargs.items() if k == "policy"})
    return LLM(model, kv_memory=blocks * probe.block_bytes / 2**30, block_size=4, **kwargs)


@pytest.mark.parametrize("policy", ["full", "rkv(budget=24,window=4)"])
def test_length_aware_admission_preempts_less_and_changes_no_token(llama, policy: str) -> None:
    """Six requests whose outputs outgrow the pool when all are admitted at once: the default admission preempts
    (prompt and output recomputed), length-aware admission waits for room instead; greedy tokens are the same."""
    prompts = _prompts(10, 13, 9, 12, 11, 8)
    blocks = 40 if policy == "full" else 24  # 160 slots for outputs ending at 56-61 tokens; 96 for budgets of ~28
    plain = _pool(llama, blocks, policy=policy)
    aware = _pool(llama, blocks, policy=policy, length_aware=True)
    base = [o.token_ids for o in plain.generate(prompts, LONG)]
    assert plain.scheduler.preemptions > 0
    assert [o.token_ids for o in aware.generate(prompts, LONG)] == base
    assert aware.scheduler.preemptions < plain.scheduler.preemptions
    assert aware.blocks.num_free == aware.blocks.num_blocks


def test_decode_budget_caps_the_reserved_growth(llama) -> None:
    """A decode-time budget holds a sequence's blocks however long it writes, so it reserves only up to them."""
    full = LLM(llama, kv_memory=0.01, block_size=4)
    rkv = LLM(llama, policy="rkv(budget=24,window=4)", kv_memory=0.01, block_size=4)
    window = LLM(llama, policy="streaming(budget=16,sinks=4)", kv_memory=0.01, block_size=4)
    assert block_cap(full.compression, 40, 4) is None
    assert block_cap(rkv.compression, 40, 4) == 7  # 24 tokens + the interval's one
    assert block_cap(window.compression, 40, 4) == 6  # 16 tokens, the block part way through and the sinks'
    assert block_cap(LLM(llama, policy="snapkv(keep=0.5,decode_budget=30,interval=4)", kv_memory=0.01,
                         block_size=4).compression, 40, 4) == 9


def test_output_lengths_predict_a_high_quantile_once_enough_requests_ended() -> None:
    lengths = OutputLengths(quantile=0.9, min_samples=4)
    for n in (10, 20, 30):
        lengths.observe(n)
    assert lengths.predict() is None
    for n in range(40, 140, 10):
        lengths.observe(n)
    assert lengths.predict() == 120  # the 90th percentile of 10..130 (nearest rank: the 12th of 13)
    with pytest.raises(ValueError, match="quantile"):
        OutputLengths(quantile=0)


def test_the_predictor_learns_from_completed_requests(llama) -> None:
    """Requests that stop early teach the engine to reserve less than max_tokens for the next ones."""
    llm = LLM(llama, kv_memory=0.01, block_size=4, length_aware=True)
    admission = llm.scheduler.admission
    llm.generate(_prompts(*range(5, 13)), SamplingParams(max_tokens=6, ignore_eos=True))
    assert admission.lengths.predict() == 6
    rid = llm.add_request(_prompts(9)[0], SamplingParams(max_tokens=200, ignore_eos=True))
    seq = llm.requests[rid][0]
    assert admission.expected_output(seq) == 6  # the learnt length, not its max_tokens
    seq.token_ids += [7] * 5
    assert admission.expected_output(seq) == 5 + 4  # past the prediction: at least a block more than written


def test_forks_reserve_their_growth_each(llama) -> None:
    """n completions of one prompt grow apart after the fork: admission reserves for each of them."""
    prompts = _prompts(10, 13, 9)
    params = SamplingParams(max_tokens=40, n=2, temperature=0.8, seed=5, ignore_eos=True)
    plain, aware = _pool(llama, 40), _pool(llama, 40, length_aware=True)
    base = [[c.token_ids for c in o.completions] for o in plain.generate(prompts, params)]
    assert [[c.token_ids for c in o.completions] for o in aware.generate(prompts, params)] == base
    assert plain.scheduler.preemptions > 0 and aware.scheduler.preemptions == 0


def test_length_aware_admission_with_chunked_prefill(llama) -> None:
    """Prompts admitted part-way through their chunks reserve their growth too: no preemption, the same tokens."""
    prompts = _prompts(30, 27, 33, 25)
    plain = _pool(llama, 44, chunked_prefill=True, max_num_batched_tokens=16)
    aware = _pool(llama, 44, chunked_prefill=True, max_num_batched_tokens=16, length_aware=True)
    base = [o.token_ids for o in plain.generate(prompts, LONG)]
    assert [o.token_ids for o in aware.generate(prompts, LONG)] == base
    assert plain.scheduler.preemptions > 0 and aware.scheduler.preemptions == 0
