"""Engines over a shared KV tier: prefixes computed by one are loaded by another, never across models or policies."""
from __future__ import annotations

import copy

import pytest
import torch

from kvslim.cache.tier import KVTier, MemoryBackend, TierUnavailable
from kvslim.engine import LLM, SamplingParams
from kvslim.models import tiny_model

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
PREFIX = torch.randint(1, 256, (40,), generator=torch.Generator().manual_seed(7)).tolist()


def _engine(model, tier: KVTier, policy: str = "full") -> LLM:
    return LLM(model, policy=policy, kv_memory=0.01, block_size=8 if policy == "full" else 32, kv_tier=tier)


@pytest.fixture
def tier() -> KVTier:
    tier = KVTier(MemoryBackend())
    yield tier
    tier.close()


def test_second_engine_loads_the_prefix_and_generates_the_same(llama, tier: KVTier) -> None:
    first = _engine(llama, tier)
    cold = first.generate([PREFIX + [3, 4]], GREEDY)[0]
    tier.flush()
    assert cold.stats["tier_prompt_tokens"] == 0 and tier.stats.writes == 5  # 40 tokens = 5 full blocks of 8
    second = _engine(llama, tier)
    warm = second.generate([PREFIX + [3, 4]], GREEDY)[0]
    assert warm.stats["tier_prompt_tokens"] == warm.stats["cached_prompt_tokens"] == 40
    assert warm.token_ids == cold.token_ids
    other = second.generate([PREFIX[:20] + [9] * 30], GREEDY)[0]  # shares 2 blocks, now in device memory
    assert other.stats["cached_prompt_tokens"] == 16 and other.stats["tier_prompt_tokens"] == 0
    assert tier.stats.hits == 5


def test_quantized_blocks_are_shared_packed(llama, tier: KVTier) -> None:
    first = _engine(llama, tier, "kivi4")
    prompt = (PREFIX * 6)[:200]  # kivi4 keeps the newest 128 tokens unpacked: 64 are packed, 2 runs of 32
    cold = first.generate([prompt], GREEDY)[0]
    tier.flush()
    shared = first.compression.shareable(len(prompt))
    assert shared > 0 and tier.stats.writes == shared // 32
    assert tier.stats.bytes_out < shared * first.dense_block_bytes / 32  # codes, not model-dtype pages
    warm = _engine(llama, tier, "kivi4").generate([prompt], GREEDY)[0]
    assert warm.stats["tier_prompt_tokens"] == shared
    assert warm.token_ids == cold.token_ids  # the suffix attended to dequantized prefix keys: same tokens here


def test_static_fp8_blocks_travel_with_their_scales(llama, tier: KVTier) -> None:
    """A tier block carries the scale it was written with: a second engine dequantizes the prefix as the first did
    and measures the same sequence scales over it."""
    prompt = (PREFIX * 6)[:200]
    first = _engine(llama, tier, "fp8_e4m3(scale=per-head)")
    cold = first.generate([prompt], GREEDY)[0]
    tier.flush()
    second = _engine(llama, tier, "fp8_e4m3(scale=per-head)")
    warm = second.generate([prompt], GREEDY)[0]
    assert warm.stats["tier_prompt_tokens"] == 192
    for layer in range(first.runner.num_layers):
        slots = torch.arange(192)
        for a, b in zip(first.runner.kv.read(layer, slots), second.runner.kv.read(layer, slots)):
            assert torch.equal(a, b)
    assert warm.token_ids == cold.token_ids


@pytest.mark.parametrize("change", ["model", "dtype", "policy"])
def test_other_model_dtype_or_policy_never_reads_the_blocks(llama, tier: KVTier, change: str) -> None:
    _engine(llama, tier).generate([PREFIX], GREEDY)
    tier.flush()
    if change == "model":
        other = _engine(tiny_model("llama", seed=1), tier)  # same config, other weights
    elif change == "dtype":
        other = _engine(copy.deepcopy(llama).to(torch.bfloat16), tier)
    else:
        other = LLM(llama, policy="int8", kv_memory=0.01, block_size=8, kv_tier=tier)
    out = other.generate([PREFIX], GREEDY)[0]
    assert out.stats["tier_prompt_tokens"] == 0 and tier.stats.hits == 0


@pytest.mark.parametrize(("policy", "why"), [("snapkv(keep=0.5)", "evicts by the whole prompt"),
                                           ("kcache(fraction=0.5)", "splits blocks between device and host")])
def test_policies_without_shareable_blocks_refuse_a_tier(llama, tier: KVTier, policy: str, why: str) -> None:
    with pytest.raises(ValueError, match=f"{why}, so its blocks are never shared"):
        LLM(llama, policy=policy, kv_memory=0.01, block_size=8, kv_tier=tier)


def test_engine_metrics_report_the_tier(llama, tier: KVTier) -> None:
    engine = _engine(llama, tier)
    engine.generate([PREFIX], GREEDY)
    tier.flush()
    assert engine.metrics().tier["writes"] == 5 and engine.metrics().tier["up"]


def test_evicted_prefix_block_spills_when_its_first_write_was_lost(llama) -> None:
    class Refusing(MemoryBackend):
        """Fails every write while ``refuse`` is set, as a store that went away would."""

        refuse = True

        def put(self, key, value):
            if self.refuse:
                raise TierUnavailable("refusing")
            super().put(key, value)

    backend = Refusing()
    tier = KVTier(backend, retry_s=0.0)
    engine = LLM(llama, kv_memory=6 * LLM(llama, kv_memory=0.001, block_size=8).block_bytes / 2**30, block_size=8,
                 kv_tier=tier)
    engine.generate([PREFIX], GREEDY)  # 5 prefix blocks cached on the device; their writes are lost
    tier.flush()
    assert not backend.entries
    backend.refuse = False
    engine.generate([PREFIX[::-1]], GREEDY)  # needs the blocks: the cached ones spill before reuse
    tier.flush()
    warm = _engine(llama, tier).generate([PREFIX], GREEDY)[0]
    assert warm.stats["tier_prompt_tokens"] == 40
    tier.close()


def test_chunked_prefill_loads_the_prefix_from_the_tier(llama, tier: KVTier) -> None:
    cold = _engine(llama, tier).generate([PREFIX + [3, 4]], GREEDY)[0]
    tier.flush()
    chunked = LLM(llama, kv_memory=0.01, block_size=8, kv_tier=tier, chunked_prefill=True, max_num_batched_tokens=16)
    warm = chunked.generate([PREFIX + [3, 4]], GREEDY)[0]
    assert warm.stats["tier_prompt_tokens"] == 40 and warm.token_ids == cold.token_ids
    again = chunked.generate([PREFIX + [5]], GREEDY)[0]  # the loaded blocks were registered in device memory
    assert again.stats["cached_prompt_tokens"] == 40 and again.stats["tier_prompt_tokens"] == 0
