"""Tensor parallelism on the CPU: 2 gloo ranks of the tiny GQA model (4 query heads, 2 KV heads: one KV head each)
give the single-process engine's tokens, for per-head methods, a quantizer and AdaKV's cross-head ranking."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvslim.engine import LLM, SamplingParams, StepFailed
from kvslim.engine.parallel import DecodeStep, RanksOutOfStep
from kvslim.engine.sequence import Sequence
from kvslim.engine.sharding import ShardedAdaKV, shard_model
from kvslim.methods import keep_top
from kvslim.models import tiny_model

# kivi4 keeps its newest 128 tokens in the ring and packs 32 at a time: prompts of 150-200 tokens pack during
# prefill and again while decoding; n=2 forks every request (shared blocks, ring rows copied on every rank).
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True, n=2)
LENGTHS = (150, 61, 200, 97)


def _prompts() -> list[list[int]]:
    return [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in LENGTHS]


@pytest.mark.parametrize("policy", ["full", "snapkv(keep=0.25)", "kivi4", "adakv(keep=0.25)", "adakv(keep=0.6)",
                                    "pyramidkv(keep=0.3)", "quest(budget=32)"])
def test_two_ranks_match_one_process(policy: str) -> None:
    prompts = _prompts()
    # ranks keep one block table per sequence (no head_blocks under tensor parallelism): one process does the same
    single = LLM(tiny_model(), policy=policy, kv_memory=0.01, head_blocks=False)
    expected = single.generate(prompts, PARAMS)
    parallel = LLM(tiny_model(), policy=policy, kv_memory=0.01, tensor_parallel_size=2)
    try:
        outputs = parallel.generate(prompts, PARAMS)
        assert 2 * parallel.block_bytes == single.block_bytes  # a rank's blocks hold half the heads: twice the blocks
        assert parallel.blocks.num_free == parallel.blocks.num_blocks
    finally:
        parallel.close()
    assert [[c.token_ids for c in o.completions] for o in outputs] == [[c.token_ids for c in o.completions] for o in expected]
    # the block manager saw the same slots per sequence: the ranks kept what one process keeps, head for head
    assert [o.stats["peak_kv_blocks"] for o in outputs] == [o.stats["peak_kv_blocks"] for o in expected]


@pytest.mark.parametrize("size, message", [(3, "must divide the model's 2 KV heads"), (4, "must divide the model's 2 KV heads"),
                                           (0, "positive number of processes")])
def test_sizes_that_cannot_own_whole_kv_heads_are_refused(size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(tiny_model(), kv_memory=0.01, tensor_parallel_size=size)


def test_kv_tier_is_refused_with_tensor_parallelism() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        LLM(tiny_model(), kv_memory=0.01, kv_tier="memory", tensor_parallel_size=2)


def test_offloading_stores_are_refused_and_the_workers_stopped() -> None:
    with pytest.raises(ValueError, match="offloading stores"):
        LLM(tiny_model(), policy="kcache(fraction=0.1)", kv_memory=0.01, tensor_parallel_size=2)
    gc.collect()  # the engine that failed to build is garbage: collecting it stops its workers
    assert not dist.is_initialized()


def _rank_keeps(rank: int, address: str) -> None:
    """Each rank holds 3 of 6 heads of tie-heavy scores (few distinct values, infinities); the union of what the
    ranks keep must be keep_top over all heads."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
    method = ShardedAdaKV(keep=0.5)
    generator = torch.Generator().manual_seed(0)
    for trial in range(40):
        scores = torch.randint(0, 4, (2, 6, 9), generator=generator).float()
        scores[scores == 0] = float("-inf")
        scores[scores == 3] = float("inf") if trial % 2 else 3.0
        budget = torch.randint(1, 10, (2, 6), generator=generator)
        whole = keep_top(scores.flatten(1)[:, None], budget.sum(-1, keepdim=True))[:, 0].view(2, 6, 9)
        mine = slice(3 * rank, 3 * rank + 3)
        kept = method.keep_layer_top(scores[:, mine].flatten(1), budget[:, mine].sum(-1)).view(2, 3, 9)
        assert torch.equal(kept, whole[:, mine]), f"trial {trial} rank {rank}"
    dist.destroy_process_group()


def test_sharded_adakv_keeps_the_layer_top_across_ranks_with_ties() -> None:
    from kvslim.engine.parallel import _free_address

    mp.spawn(_rank_keeps, args=(_free_address(),), nprocs=2)


def test_a_shard_holds_its_slices_and_leaves_the_model_whole() -> None:
    model = tiny_model()
    shard = shard_model(model, 1, 2, torch.device("cpu"))
    attn, whole = shard.model.layers[0].self_attn, model.model.layers[0].self_attn
    assert torch.equal(attn.k_proj.weight, whole.k_proj.weight[16:])  # KV head 1 of 2 (head_dim 16)
    assert torch.equal(attn.q_proj.weight, whole.q_proj.weight[32:])  # its query group: heads 2 and 3
    assert torch.equal(attn.o_proj.weight, whole.o_proj.weight[:, 32:])
    assert torch.equal(shard.model.embed_tokens.weight, model.model.embed_tokens.weight[128:])
    assert whole.q_proj.out_features == 64 and attn.q_proj.out_features == 32


def test_a_meta_model_is_drawn_shard_by_shard() -> None:
    """A random-weight preset too large for one device: each rank draws only its slices, norms at 1 and real RoPE."""
    model = tiny_model()
    shard = shard_model(tiny_model().to("meta"), 0, 2, torch.device("cpu"))
    assert not any(p.is_meta for p in shard.parameters())
    assert shard.model.layers[1].mlp.down_proj.weight.shape == (64, 64)
    assert bool(shard.model.layers[0].mlp.gate_proj.weight.std() > 0)
    assert bool((shard.model.norm.weight == 1).all())
    assert torch.equal(shard.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_a_step_that_fails_part_way_stops_the_engine_cleanly() -> None:
    """Rank 0 fails after the workers started the step: they wait in a collective that never completes, so further
    steps are refused (not hung) and close() terminates them."""
    llm = LLM(tiny_model(), kv_memory=0.01, tensor_parallel_size=2)
    try:
        def fail(views: list) -> None:
            raise RuntimeError("device lost")

        llm.runner.rank.decode = fail
        llm.add_request(list(range(1, 20)), SamplingParams(max_tokens=4, ignore_eos=True))
        llm.step()  # the prefill runs on both ranks
        with pytest.raises(StepFailed, match="device lost"):
            llm.step()  # the request that step ran is dropped; the engine refuses to go on
        llm.add_request(list(range(1, 9)), SamplingParams(max_tokens=2))
        with pytest.raises(RanksOutOfStep, match="out of step"):
            llm.step()
    finally:
        llm.close()
    assert not any(p.is_alive() for p in llm.runner.workers.processes) and not dist.is_initialized()


@pytest.mark.parametrize("arch, attention, policy", [("qwen2", "gqa", "full"), ("llama", "mha", "adakv(keep=0.25)")])
def test_biases_several_heads_per_rank_and_cached_prefixes(arch: str, attention: str, policy: str) -> None:
    """Qwen2's q/k/v biases are split with their heads; with MHA each rank holds 2 KV heads, which AdaKV ranks
    against the other rank's; a second prompt sharing the first one's prefix reads its blocks on every rank."""
    common = _prompts()[0][:64]
    prompts = [common + [5, 6, 7], common + [9, 10]]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    single = LLM(tiny_model(arch, attention), policy=policy, kv_memory=0.01, head_blocks=False)  # the ranks' layout
    expected = [single.generate([p], params)[0] for p in prompts]
    parallel = LLM(tiny_model(arch, attention), policy=policy, kv_memory=0.01, tensor_parallel_size=2)
    try:
        outputs = [parallel.generate([p], params)[0] for p in prompts]
    finally:
        parallel.close()
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    assert [o.stats["cached_prompt_tokens"] for o in outputs] == [o.stats["cached_prompt_tokens"] for o in expected]
    assert [o.stats["peak_kv_blocks"] for o in outputs] == [o.stats["peak_kv_blocks"] for o in expected]
    if policy == "full":
        assert outputs[1].stats["cached_prompt_tokens"] == 64


def test_a_decode_step_carries_every_sequence_field_a_rank_reads() -> None:
    """Ragged heads on one sequence only, tables of different widths (one with a block a window dropped), rings."""
    ragged = Sequence(list(range(30)), SamplingParams(), block_table=[-1, 7, 9], kv_slots=40, window_start=18, sinks=2,
                      ring_row=3, pad=torch.tensor([[0, 2], [1, 0]]), tail=torch.tensor([[5, 6], [7, 8]]))
    plain = Sequence([4, 5, 6], SamplingParams(), block_table=[2], kv_slots=3, ring_row=0, tail=torch.tensor([[1, 1], [1, 1]]))
    step = DecodeStep.of([ragged, plain])
    for lo, hi in ((0, 1), (1, 2)):
        for seq, view in zip((ragged, plain), step.views(lo, hi)):
            assert (view.last_token, len(view), view.block_table) == (seq.last_token, len(seq), seq.block_table)
            assert (view.kv_slots, view.window_start, view.sinks, view.ring_row) == (seq.kv_slots, seq.window_start,
                                                                                     seq.sinks, seq.ring_row)
            assert torch.equal(view.slot_lens(2, 1), seq.slot_lens(2, 2)[:, lo:hi])
            assert torch.equal(view.tail, seq.tail[:, lo:hi])


@pytest.mark.parametrize("policy", ["kvzip(keep=0.5)", "rkv(budget=32)", "auto(keep=0.5)", "think(ratio=0.5)"])
def test_probing_and_decode_time_methods_are_refused(policy: str) -> None:
    with pytest.raises(ValueError, match="under tensor parallelism"):
        LLM(tiny_model(), policy=policy, kv_memory=0.01, tensor_parallel_size=2)
    assert not dist.is_initialized()


def test_expected_attention_matches_one_process() -> None:
    """A scorer that projects queries with RoPE gets the frequencies on every rank."""
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompt = _prompts()[0]
    single = LLM(tiny_model(), policy="expected_attention(keep=0.5)", kv_memory=0.01).generate([prompt], params)[0]
    parallel = LLM(tiny_model(), policy="expected_attention(keep=0.5)", kv_memory=0.01, tensor_parallel_size=2)
    try:
        assert parallel.generate([prompt], params)[0].completions[0].token_ids == single.completions[0].token_ids
    finally:
        parallel.close()
