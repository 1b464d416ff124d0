"""Quest in the engine: a budget covering the context equals full, small budgets equal the Hugging Face path
token for token, block extrema follow every write, and the extrema's bytes are paid per block."""
from __future__ import annotations

import pytest
import torch

from kvslim.engine import LLM, SamplingParams
from kvslim.engine.kv_store import dense_block_bytes
from kvslim.engine.quest_kv import QuestKV
from hf_greedy import hf_greedy

#: 3 tokens: one partial page; 40: fewer pages than some budgets read; 200 and 300: the pages read are a choice
PROMPTS = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 40, 200, 300)]
GREEDY = SamplingParams(max_tokens=30, ignore_eos=True)


def _tokens(model, spec: str) -> list[list[int]]:
    return [out.token_ids for out in LLM(model, policy=spec, kv_memory=0.01).generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("attention", ["gqa", "mha", "mqa"])
def test_budget_covering_the_context_equals_full(attention: str) -> None:
    from kvslim.models import tiny_model

    model = tiny_model("llama", attention, seed=0)
    assert _tokens(model, "quest(budget=4096)") == _tokens(model, "full")


@pytest.mark.parametrize("spec", [
    "quest(budget=64)",
    "quest(budget=32,sink_pages=0)",  # the newest page and the single best other one
    "quest(budget=64,page=8,sink_pages=2)",
    "snapkv(keep=0.5,window=4)+quest(budget=48)",  # pages over the kept tokens, left-aligned per head
    "adakv(keep=0.3,window=4)+quest(budget=32)",  # ragged heads: each bounds its own pages
])
def test_small_budget_matches_the_hf_cache_path(llama, spec: str) -> None:
    llm = LLM(llama, policy=spec, kv_memory=0.01)
    outputs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == hf_greedy(llama, spec, prompt, GREEDY.max_tokens)
    assert [o.token_ids for o in outputs] != _tokens(llama, "full")  # the selection is a real one
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_block_extrema_follow_prefill_and_decode_writes(llama) -> None:
    """After a run, every block a sequence wrote holds the min/max of the keys in it (decode writes included)."""
    llm = LLM(llama, policy="quest(budget=32)", kv_memory=0.01)
    kv: QuestKV = llm.runner.kv  # type: ignore[assignment]
    seen: list[tuple[list[int], int]] = []
    original = llm.blocks.free_seq

    def keep_table(seq):  # a finished request's blocks go back (unchanged): note them first
        seen.append((list(seq.block_table), seq.kv_slots))
        original(seq)

    llm.blocks.free_seq = keep_table
    llm.generate([PROMPTS[2]], SamplingParams(max_tokens=21, ignore_eos=True))  # 200 + 20 written: a partial block
    ((table, slots),) = seen
    assert slots == 220
    for layer in range(llama.config.num_hidden_layers):
        for i, block in enumerate(table):
            held = min(16, slots - 16 * i)
            keys = kv.k_cache[layer, block, :held]  # (held, H, D)
            torch.testing.assert_close(kv.kmin[layer, block], keys.amin(0), rtol=0, atol=0)
            torch.testing.assert_close(kv.kmax[layer, block], keys.amax(0), rtol=0, atol=0)


def test_a_block_pays_for_its_extrema(llama) -> None:
    llm = LLM(llama, policy="quest(budget=64)", kv_memory=0.01)
    config = llama.config
    head_dim = config.hidden_size // config.num_attention_heads
    dense = dense_block_bytes(config.num_hidden_layers, config.num_key_value_heads, head_dim, torch.float32, 16)
    assert llm.block_bytes == dense + dense // 16  # two vectors per block next to 2 * 16 per block
    assert llm.blocks.block_size == 16


def test_block_size_other_than_the_page_is_refused(llama) -> None:
    with pytest.raises(ValueError, match="block_size=16"):
        LLM(llama, policy="quest(budget=64,page=16)", kv_memory=0.01, block_size=32)


def check_engine_with_triton_kernels() -> None:
    """The engine's store with the Triton scorer, extrema fold and sparse decode (what it runs on CUDA) decodes what
    it decodes with the references in their place."""
    from kvslim.kernels import quest, quest_ref
    from kvslim.models import tiny_model

    model = tiny_model("llama", "gqa", seed=0).to("cuda" if torch.cuda.is_available() else "cpu")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = PROMPTS[1:3]
    reference = LLM(model, policy="quest(budget=32)", kv_memory=0.01)
    kernels = LLM(model, policy="quest(budget=32)", kv_memory=0.01)
    ref: QuestKV = reference.runner.kv  # type: ignore[assignment]
    ref._score, ref._fold, ref._sparse = (quest_ref.quest_block_scores_ref, quest_ref.fold_block_extrema_ref,
                                          quest_ref.paged_sparse_decode_ref)
    store: QuestKV = kernels.runner.kv  # type: ignore[assignment]
    store._score, store._fold = quest.quest_block_scores, quest.fold_block_extrema
    store._sparse = quest.paged_sparse_decode
    want = [o.token_ids for o in reference.generate(prompts, params)]
    assert [o.token_ids for o in kernels.generate(prompts, params)] == want
    for mine, theirs in ((store.kmin, ref.kmin), (store.kmax, ref.kmax)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)  # keys differ by the decode's rounding only


def test_engine_runs_the_triton_kernels_as_the_references() -> None:
    pytest.importorskip("triton")
    from interpreted import natively_or_interpreted

    natively_or_interpreted(__file__, check_engine_with_triton_kernels, timeout_s=600)


if __name__ == "__main__":
    check_engine_with_triton_kernels()
