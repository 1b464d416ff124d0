"""ThinK in the engine: key pages of the kept channels, the same tokens and logits as kvslim.Cache, fewer bytes."""
from __future__ import annotations

import pytest
import torch

import kvslim
from kvslim.engine import LLM, SamplingParams
from kvslim.engine.scheduler import RequestTooLarge
from kvslim.hf_compat import cache_arg
from kvslim.models import tiny_model
from hf_greedy import hf_greedy
from qwen_shaped import qwen_shaped

PROMPTS = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 71)]
SPECS = ["think(ratio=0.5)", "snapkv(keep=0.5)+think(ratio=0.5)"]
#: what each spec attends like without ThinK: its logits must differ, or the logits test could not fail
WITHOUT_THINK = {"think(ratio=0.5)": "full", "snapkv(keep=0.5)+think(ratio=0.5)": "snapkv(keep=0.5)"}


@pytest.fixture(params=["gqa", "mha", "qwen-shaped"])
def model(request):
    """Tiny Llamas, and Qwen2.5-0.5B's attention shapes (a group of 7, 32 of 64 key channels kept)."""
    return qwen_shaped() if request.param == "qwen-shaped" else tiny_model("llama", request.param, seed=0)


@pytest.mark.parametrize("spec", [*SPECS, "adakv(keep=0.3,window=4)+think(ratio=0.5)",  # ragged heads
                                  "pyramidkv(keep=0.3,window=4)+think(ratio=0.25,window=4)"])  # ragged layers, D'=12
def test_engine_matches_hf_cache_path(model, spec: str) -> None:
    llm = LLM(model, policy=spec, kv_memory=0.01, block_size=4)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    assert [out.token_ids for out in outs] == [hf_greedy(model, spec, prompt, 24) for prompt in PROMPTS]


@torch.inference_mode()
def _hf_logits(model, spec: str, prompt: list[int], n: int) -> torch.Tensor:
    """(n, vocab) logits of ``n`` greedy steps through kvslim.Cache(spec), the prefill's first."""
    cache = kvslim.Cache(kvslim.policy(spec), model.config)
    ids, out = torch.tensor([prompt]), []
    for _ in range(n):
        logits = model(ids, use_cache=True, **cache_arg(cache)).logits[0, -1].float()
        out.append(logits)
        ids = logits.argmax().view(1, 1)
    return torch.stack(out)


def _engine_decode_logits(model, spec: str, prompt: list[int], n: int) -> torch.Tensor:
    """(n - 1, vocab) logits of the engine's decode steps for ``n`` greedy tokens."""
    llm = LLM(model, policy=spec, kv_memory=0.01, block_size=4)
    seen: list[torch.Tensor] = []
    decode = llm.runner.decode
    llm.runner.decode = lambda batch: seen.append(decode(batch)) or seen[-1]
    llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))
    return torch.cat(seen)


@pytest.mark.parametrize("spec", SPECS)
def test_decode_logits_equal_hf_cache_path(model, spec: str) -> None:
    """Finer than tokens (a tiny random model's argmax rarely moves): each decode step's logits equal kvslim.Cache's
    to float32 rounding, while pruning the channels moves them by about 1e-3 (and attending with the decoded token's
    thin key instead of its whole one, the ``newest`` score, by about 3e-4)."""
    hf = _hf_logits(model, spec, PROMPTS[1], 12)
    engine = _engine_decode_logits(model, spec, PROMPTS[1], 12)
    torch.testing.assert_close(engine, hf[1:], atol=1e-5, rtol=0)
    assert float((hf - _hf_logits(model, WITHOUT_THINK[spec], PROMPTS[1], 12)).abs().max()) > 1e-3


def test_bytes_per_token_equal_hf_nbytes(model) -> None:
    """A block costs its tokens' thin keys and whole values; a sequence's row its channel indices: together what
    kvslim.Cache's nbytes counts for the same tokens."""
    spec, n = "think(ratio=0.5)", 9
    llm = LLM(model, policy=spec, kv_memory=0.01, block_size=4)
    cache = kvslim.Cache(kvslim.policy(spec), model.config)
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        for _ in range(n):
            ids = model(ids, use_cache=True, **cache_arg(cache)).logits[0, -1].argmax().view(1, 1)
    tokens = len(PROMPTS[0]) + n - 1  # the prompt and every decoded token but the last
    assert cache.nbytes() == tokens * llm.block_bytes // llm.blocks.block_size + llm.runner.kv.row_bytes


def test_more_tokens_fit_in_the_same_kv_memory(model) -> None:
    """Half the key channels: a block takes 3/4 of a model-dtype one, so about 4/3 as many fit (less a channel row
    per sequence that may run), and a prompt that a full cache cannot hold in that memory runs."""
    gib = 0.0002
    full = LLM(model, kv_memory=gib, block_size=4, max_num_seqs=8)
    thin = LLM(model, policy="think(ratio=0.5)", kv_memory=gib, block_size=4, max_num_seqs=8)
    assert thin.block_bytes * 4 == full.block_bytes * 3
    rows = thin.blocks.rows * thin.runner.kv.row_bytes
    assert thin.blocks.num_blocks == (int(gib * 2**30) - rows) // thin.block_bytes
    assert thin.blocks.num_blocks > full.blocks.num_blocks * 5 // 4
    prompt = (PROMPTS[1] * 40)[: (full.blocks.num_blocks + 1) * 4]  # one block more than the full pool holds
    with pytest.raises(RequestTooLarge):
        full.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
    assert len(thin.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))[0].token_ids) == 1


def test_forks_keep_the_prompts_channels(model) -> None:
    """n=2 completions share the prompt's blocks; the fork's row gets its parent's channels."""
    spec = "snapkv(keep=0.5)+think(ratio=0.5)"
    llm = LLM(model, policy=spec, kv_memory=0.01, block_size=4)
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=12, ignore_eos=True, n=2))[0]
    assert [c.token_ids for c in out.completions] == [hf_greedy(model, spec, PROMPTS[1], 12)] * 2


def test_chunked_prefill_runs_the_prompt_whole_and_shares_no_prefix(llama) -> None:
    """Thin key pages cannot hold an earlier chunk's whole keys, so the prompt runs in one piece; what ThinK keeps
    depends on the whole prompt, so no block is shared between prompts."""
    spec = "think(ratio=0.5)"
    llm = LLM(llama, policy=spec, kv_memory=0.01, block_size=4, chunked_prefill=True, max_num_batched_tokens=16)
    assert not llm.compression.chunkable and llm.compression.shareable(len(PROMPTS[1])) == 0
    outs = llm.generate([PROMPTS[1], PROMPTS[1]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(llama, spec, PROMPTS[1], 8)] * 2
    assert all(o.stats["cached_prompt_tokens"] == 0 for o in outs)


@pytest.mark.parametrize(("spec", "reason"), [
    ("think+kivi4", "either thin model-dtype keys .think. or kivi4's codes"),
    ("think+snapkv(keep=0.5)", "comes last here"),
    ("think(prune_decoded=false)", "prune_decoded=false keeps decoded keys whole"),
    ("kvzip(keep=0.5)+think", "before KVzip's probes read them"),
])
def test_unsupported_think_hybrids_are_refused_clearly(llama, spec: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        LLM(llama, policy=spec, kv_memory=0.01)
