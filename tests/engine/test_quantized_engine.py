"""Quantized pages in the engine: the same greedy tokens as kvslim.Cache, more sequences in the same memory,
preemption and forks, and clear refusals."""
from __future__ import annotations

import pytest
import torch

import kvslim
from kvslim.engine import LLM, SamplingParams
from hf_greedy import hf_greedy

#: 40 tokens: nothing packed at prefill under KIVI; 200 and 300: packed runs, and runs packed while decoding
PROMPTS = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 200, 300)]


@pytest.mark.parametrize("spec", [
    "kivi4",
    "int8",
    "fp8",
    "fp8_e4m3",  # vLLM's --kv-cache-dtype fp8: static scales per sequence
    "fp8_e5m2(scale=per-head)",
    "kivi2(group=8,residual=16)",  # a pack every 8 steps
    "snapkv(keep=0.5,window=4)+kivi4",
    "adakv(keep=0.3,window=4)+int8",  # ragged heads: each head packs at its own slot
    "snapkv(keep=0.5,window=4)+fp8_e5m2",  # scales measured over the kept tokens, in both paths
])
def test_engine_matches_hf_cache_path(llama, spec: str) -> None:
    llm = LLM(llama, policy=spec, kv_memory=0.01)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=40, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(llama, spec, prompt, 40)
    assert llm.blocks.num_free == llm.blocks.num_blocks and len(llm.blocks.free_rows) == llm.blocks.rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs in the engine on a GPU")
@pytest.mark.parametrize("spec", ["kivi4", "kivi2", "int8", "int4", "fp8", "snapkv(keep=0.5,window=4)+kivi4",
                                  "fp8_e4m3", "fp8_e5m2(scale=per-head)"])
def test_triton_path_matches_hf_cache_path_on_gpu(spec: str) -> None:
    from kvslim.models import tiny_model

    model = tiny_model("llama", "gqa", seed=0).cuda()
    llm = LLM(model, policy=spec, kv_memory=0.01)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=40, ignore_eos=True))
    agree = [sum(a == b for a, b in zip(out.token_ids, hf_greedy(model, spec, prompt, 40))) for prompt, out in zip(PROMPTS, outs)]
    assert sum(agree) >= 0.95 * 40 * len(PROMPTS), agree  # tf32 products on the GPU may flip a near tie


def _most_running(llm: LLM, prompts: list[list[int]], max_tokens: int) -> int:
    for prompt in prompts:
        llm.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    most = 0
    while llm.has_unfinished:
        llm.step()
        most = max(most, llm.metrics().running)
    return most


def test_more_sequences_run_at_once_in_the_same_memory(llama) -> None:
    """A pool that fits two full-precision sequences runs over twice as many int8 or kivi4 ones (ring rows included)."""
    prompts = [torch.randint(1, 256, (1500,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(10)]
    per_sequence = LLM(llama, kv_memory=0.01).dense_block_bytes * 96  # 96 blocks of 16: 1500 + 8 tokens, rounded up
    memory = 2.5 * per_sequence / 2**30
    running = {spec: _most_running(LLM(llama, policy=spec, kv_memory=memory), prompts, 8)
               for spec in ("full", "int8", "kivi4")}
    assert running["full"] == 2
    assert running["int8"] >= 2 * running["full"] and running["kivi4"] >= 2 * running["full"], running


def test_preemption_with_quantized_pages_gives_the_same_tokens(llama) -> None:
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    roomy = LLM(llama, policy="int8", kv_memory=0.01).generate(PROMPTS, params)
    probe = LLM(llama, policy="int8", kv_memory=0.01)
    # 37 blocks of 16: all three prompts are admitted (35 blocks, with a block of headroom for each running
    # sequence), decoding them needs 39
    memory = (probe.block_bytes * 37 + probe.runner.kv.row_bytes * 3) / 2**30
    tight = LLM(llama, policy="int8", kv_memory=memory, max_num_seqs=3)
    assert tight.blocks.num_blocks == 37
    outs = tight.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert tight.scheduler.preemptions > 0
    assert tight.blocks.num_free == tight.blocks.num_blocks and len(tight.blocks.free_rows) == tight.blocks.rows


def test_forked_completions_copy_their_ring_rows(llama) -> None:
    llm = LLM(llama, policy="kivi4", kv_memory=0.01)
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=30, ignore_eos=True, n=3))[0]
    single = LLM(llama, policy="kivi4", kv_memory=0.01).generate([PROMPTS[1]],
                                                                 SamplingParams(max_tokens=30, ignore_eos=True))
    assert [c.token_ids for c in out.completions] == [single[0].token_ids] * 3


def test_stats_count_quantized_blocks_and_the_ring_row(llama) -> None:
    llm = LLM(llama, policy="kivi4", kv_memory=0.01)
    out = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    # 300 + 4 tokens: 160 packed (5 runs of 32) in 5 blocks, the newest 144 in the ring row
    assert out.stats["peak_kv_bytes"] == 5 * llm.block_bytes + llm.runner.kv.row_bytes
    assert out.stats["full_kv_bytes"] == 10 * llm.dense_block_bytes


@pytest.mark.parametrize(("spec", "kwargs", "reason"), [
    ("streaming(budget=64)+kivi4", {}, "window over model-dtype pages only"),
    ("kivi4", {"block_size": 16}, "multiple of 32"),
])
def test_unsupported_quantized_setups_are_refused_clearly(llama, spec: str, kwargs: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        LLM(llama, policy=spec, kv_memory=0.01, **kwargs)


@pytest.mark.parametrize(("spec", "per_head"), [("fp8_e4m3", False), ("fp8_e5m2(scale=per-head)", True)])
def test_static_fp8_blocks_hold_one_byte_per_element_and_their_scales(llama, spec: str, per_head: bool) -> None:
    llm = LLM(llama, policy=spec, kv_memory=0.01)
    kv = llm.runner.kv
    scales = kv.num_kv_heads if per_head else 1
    per_layer = 2 * (16 * kv.num_kv_heads * kv.head_dim + scales * 4)  # keys and values: codes, float32 scales
    assert llm.block_bytes == kv.num_layers * per_layer
    assert kv.pages.keys.codes.dtype == torch.uint8 and kv.pages.keys.scale.shape[-1] == scales
    full = LLM(llama, kv_memory=0.01)
    assert full.dense_block_bytes == kv.num_layers * 2 * 16 * kv.num_kv_heads * kv.head_dim * 4  # float32 model


def test_kv_cache_dtype_appends_the_fp8_format_to_the_policy(llama) -> None:
    llm = LLM(llama, policy="snapkv(keep=0.5,window=4)", kv_memory=0.01, kv_cache_dtype="fp8_e5m2", kv_scale="per-head")
    assert llm.policy.spec == kvslim.policy("snapkv(keep=0.5,window=4)+fp8_e5m2(scale=per-head)").spec
    assert LLM(llama, kv_memory=0.01, kv_cache_dtype="fp8").policy.spec == kvslim.policy("fp8_e4m3").spec
    with pytest.raises(ValueError, match="is not one of auto, fp8, fp8_e4m3, fp8_e5m2"):
        LLM(llama, kv_memory=0.01, kv_cache_dtype="float8")


def _prefill_scales(llm: LLM, prompt: list[int]) -> tuple[torch.Tensor, int]:
    """The scales a static-fp8 sequence measured at its prefill, and its prompt tokens the prefix cache gave it."""
    llm.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    llm.step()
    seq = llm.scheduler.running[0]
    scales = llm.runner.kv.scales[:, seq.ring_row].clone()
    while llm.has_unfinished:
        llm.step()
    return scales, seq.num_cached_tokens


def test_static_fp8_prefix_hit_measures_scales_over_the_cached_tokens(llama) -> None:
    """A repeated prompt takes its first blocks from the prefix cache; its scales still cover those tokens (read back
    from the blocks), so they are the first run's, not those of the few tokens it recomputes."""
    llm = LLM(llama, policy="fp8_e4m3(scale=per-head)", kv_memory=0.01)
    first, _ = _prefill_scales(llm, PROMPTS[1])
    again, cached = _prefill_scales(llm, PROMPTS[1])
    assert cached == 192
    assert torch.allclose(again, first, rtol=1e-6)
