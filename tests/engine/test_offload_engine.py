"""KCache and PQCache in the engine: reading every token equals full, small N (k) equals the Hugging Face path
token for token, device and host bytes are accounted apart, forks and preemption run, and what the stores
cannot do is refused clearly."""
from __future__ import annotations

import pytest
import torch

from kvslim.engine import LLM, SamplingParams
from hf_greedy import hf_greedy

#: 3 tokens: fewer than PQCache's windows below (codebooks trained at a flush, not at the prefill); 40: fewer
#: than some N (every offloaded token read); 200 and 300: top N is a real choice
PROMPTS = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 40, 200, 300)]
GREEDY = SamplingParams(max_tokens=30, ignore_eos=True)


def _tokens(model, spec: str, **kwargs) -> list[list[int]]:
    return [out.token_ids for out in LLM(model, policy=spec, kv_memory=0.01, **kwargs).generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize(("spec", "reference"), [
    ("kcache(n=100000,full_layers=1,recent=4)", "full"),
    ("kcache(fraction=1.0,full_layers=0,recent=1)", "full"),
    ("kcache(fraction=0.1)", "full"),  # full_layers=2 keeps both layers of the tiny model whole: nothing offloaded
    ("snapkv(keep=0.5,window=4)+kcache(n=100000,full_layers=0,recent=3)", "snapkv(keep=0.5,window=4)"),
    ("pqcache(k=100000,window=2,m=4,bits=3)", "full"),
    ("snapkv(keep=0.5,window=4)+pqcache(fraction=1.0,window=3)", "snapkv(keep=0.5,window=4)"),
])
def test_reading_every_token_equals_the_uncompressed_store(llama, spec: str, reference: str) -> None:
    assert _tokens(llama, spec) == _tokens(llama, reference)


@pytest.mark.parametrize("spec", [
    "kcache(n=8,full_layers=1,recent=5)",
    "kcache(fraction=0.1,full_layers=0,recent=1)",  # a flush after every step
    "kcache(n=4,full_layers=0,recent=64)",  # the ring never fills in 30 steps
    "adakv(keep=0.3,window=4)+kcache(n=6,full_layers=1,recent=4)",  # ragged heads: each flushes at its own slots
    "pqcache(k=8,window=4,m=4,bits=3)",  # 3 bits: many codes tie, the earlier token wins in both paths
    "pqcache(fraction=0.1,window=8)",
    "pqcache(k=4,window=0,m=2,bits=4)",  # no window: each step's token is coded and offloaded after it
    "snapkv(keep=0.5,window=4)+pqcache(k=6,window=4)",
    "pyramidkv(keep=0.5,window=4)+pqcache(k=6,window=4)",  # every layer keeps its own number of tokens
])
def test_small_n_matches_the_hf_cache_path(llama, spec: str) -> None:
    llm = LLM(llama, policy=spec, kv_memory=0.01)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        assert out.token_ids == hf_greedy(llama, spec, prompt, GREEDY.max_tokens)
    assert llm.blocks.num_free == llm.blocks.num_blocks and len(llm.blocks.free_rows) == llm.blocks.rows


def test_device_and_host_bytes_are_reported_apart(llama) -> None:
    """No first layers kept whole: the device holds the keys (half a full block) plus the ring row, the host the
    values; each decode step copies exactly N values per offloaded layer and KV head to the device."""
    n, steps = 8, 10
    llm = LLM(llama, policy=f"kcache(n={n},full_layers=0,recent=4)", kv_memory=0.01)
    kv = llm.runner.kv
    (out,) = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=steps, ignore_eos=True))
    stats = out.stats
    half = stats["peak_kv_blocks"] * llm.dense_block_bytes // 2
    assert stats["peak_kv_bytes"] == half + kv.row_bytes
    assert stats["peak_kv_host_bytes"] == half
    config = llama.config
    head_dim = config.hidden_size // config.num_attention_heads
    value_row = config.num_key_value_heads * head_dim * 4  # float32
    assert kv.h2d_bytes == (steps - 1) * config.num_hidden_layers * n * value_row  # the first token comes from prefill
    full = LLM(llama, kv_memory=0.01).generate([PROMPTS[3]], SamplingParams(max_tokens=steps, ignore_eos=True))[0]
    assert full.stats["peak_kv_host_bytes"] == 0
    assert stats["peak_kv_bytes"] - kv.row_bytes <= 0.55 * full.stats["peak_kv_bytes"]


def test_pqcache_keeps_codes_on_the_device_and_exact_rows_on_the_host(llama) -> None:
    """One byte per sub-space and token on the device (plus the window ring and codebooks row), every exact key and
    value on the host; each decode step fetches exactly k keys and values per layer and KV head."""
    k, steps, m = 8, 10, 4
    llm = LLM(llama, policy=f"pqcache(k={k},window=4,m={m},bits=3)", kv_memory=0.01)
    kv = llm.runner.kv
    (out,) = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=steps, ignore_eos=True))
    stats, config = out.stats, llama.config
    blocks, layers, heads = stats["peak_kv_blocks"], config.num_hidden_layers, config.num_key_value_heads
    assert stats["peak_kv_bytes"] == blocks * llm.blocks.block_size * layers * heads * m + kv.row_bytes
    assert stats["peak_kv_host_bytes"] == blocks * llm.dense_block_bytes
    head_dim = config.hidden_size // config.num_attention_heads
    assert kv.h2d_bytes == (steps - 1) * layers * heads * k * 2 * head_dim * 4  # keys and values, float32


@pytest.mark.parametrize("spec", ["kcache(n=8,full_layers=1,recent=4)", "pqcache(k=8,window=4)"])
def test_greedy_forks_agree_with_the_hf_cache_path(llama, spec: str) -> None:
    llm = LLM(llama, policy=spec, kv_memory=0.01)
    pair = llm.generate([PROMPTS[2]], SamplingParams(n=2, max_tokens=12, ignore_eos=True))
    first, second = pair[0].completions
    assert first.token_ids == second.token_ids == hf_greedy(llama, spec, PROMPTS[2], 12)


def test_preemption_runs_to_the_end(llama) -> None:
    """KCache only: PQCache's pages (a byte per sub-space) are so small next to its ring row that a pool tight
    enough to preempt cannot also hold the two rows it would need to run two sequences."""
    spec = "kcache(n=8,full_layers=1,recent=4)"
    probe = LLM(llama, policy=spec, kv_memory=0.01)
    # two ring rows and 41 blocks: two 300-token prompts (19 blocks each) start together, then outgrow the pool
    tight = (2 * probe.runner.kv.row_bytes + 41.5 * probe.block_bytes) / 2**30
    llm = LLM(llama, policy=spec, kv_memory=tight, max_num_seqs=2)
    outs = llm.generate(PROMPTS[3:] * 3, SamplingParams(max_tokens=40, ignore_eos=True))
    assert all(len(out.token_ids) == 40 for out in outs)
    assert llm.scheduler.preemptions > 0
    assert llm.blocks.num_free == llm.blocks.num_blocks and len(llm.blocks.free_rows) == llm.blocks.rows


@pytest.mark.parametrize(("spec", "reason"), [
    ("streaming(budget=8,sinks=4)+kcache(n=4)", "slides StreamingLLM's window"),
    ("streaming(budget=8,sinks=4)+pqcache(k=4)", "slides StreamingLLM's window"),
    ("pqcache(k=4,m=3)", "must divide the head dimension"),
])
def test_what_the_store_cannot_do_is_refused(llama, spec: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        LLM(llama, policy=spec, kv_memory=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host pages and asynchronous copies need a GPU")
def test_gpu_paths_match_hf_cache_path() -> None:
    from kvslim.models import tiny_model

    model = tiny_model("llama", "gqa", seed=0).cuda()
    for spec in ("kcache(n=8,full_layers=1,recent=5)", "pqcache(k=8,window=4)"):
        llm = LLM(model, policy=spec, kv_memory=0.01)
        host = llm.runner.kv.v_host if spec.startswith("kcache") else llm.runner.kv.kv_host
        assert host.is_pinned()
        outs = llm.generate(PROMPTS, GREEDY)
        agree = [sum(a == b for a, b in zip(out.token_ids, hf_greedy(model, spec, p, 30))) for p, out in zip(PROMPTS, outs)]
        assert sum(agree) >= 0.95 * 30 * len(PROMPTS), (spec, agree)  # tf32 products on the GPU may flip a near tie
