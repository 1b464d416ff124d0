"""The engine's direct decoder reproduces Hugging Face greedy decoding token for token (full cache)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvslim.engine import LLM, SamplingParams
from kvslim.hf_compat import cache_arg
from kvslim.models import tiny_config, tiny_model


def _prompts(lengths: tuple[int, ...]) -> list[list[int]]:
    return [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]


@torch.inference_mode()
def _hf_greedy(model, prompt: list[int], n: int, cache=None) -> list[int]:
    """Hugging Face's own forward with a DynamicCache (or the given kvslim.Cache), argmax each step, EOS ignored."""
    cache = cache if cache is not None else DynamicCache(config=model.config)
    ids, out = torch.tensor([prompt]), []
    for _ in range(n):
        logits = model(ids, use_cache=True, **cache_arg(cache)).logits[0, -1]
        out.append(int(logits.argmax()))
        ids = torch.tensor([[out[-1]]])
    return out


def test_matches_hf_greedy_on_every_tiny_architecture(model) -> None:
    """Llama (MHA, GQA, MQA), Qwen2 (q/k/v biases) and Mistral; three prompt lengths decoded in one batch."""
    prompts = _prompts((5, 13, 30))
    llm = LLM(model, kv_memory=0.01, block_size=4)
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in outs] == [_hf_greedy(model, p, 10) for p in prompts]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_equals_hf_generate(arch: str) -> None:
    """``LLM.generate`` and ``model.generate(do_sample=False)`` agree token for token on every architecture the engine
    runs (Qwen3: per-head q/k RMSNorm before RoPE). No EOS on either side, so all 12 tokens are compared."""
    model = tiny_model(arch)
    model.generation_config.eos_token_id = None
    prompts = _prompts((7, 24))
    outs = LLM(model, kv_memory=0.01, block_size=4).generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist()


def test_mistral_context_ends_at_its_sliding_window() -> None:
    """The engine has no sliding-window attention, so it refuses a Mistral request that would reach past the window
    and is exact up to it (within the window every token sees every earlier one)."""
    config = tiny_config("mistral")
    config.sliding_window = 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    llm = LLM(model, kv_memory=0.01, block_size=4)
    prompt = _prompts((20,))[0]
    with pytest.raises(ValueError, match="maximum context of 32 tokens"):
        llm.generate([prompt], SamplingParams(max_tokens=13, ignore_eos=True))
    out = llm.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))
    assert out[0].token_ids == _hf_greedy(model, prompt, 12)


def test_matches_hf_with_llama3_rope_scaling() -> None:
    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    prompt = _prompts((80,))[0]
    out = LLM(model, kv_memory=0.01, block_size=16).generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))
    assert out[0].token_ids == _hf_greedy(model, prompt, 8)


def test_unsupported_models_are_refused(llama) -> None:
    llama.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="llama, qwen2, mistral, qwen3"):
        LLM(llama, kv_memory=0.01)


@pytest.mark.slow
def test_matches_hf_on_real_smollm2() -> None:
    from kvslim.models import load_smollm2

    model, tokenizer = load_smollm2()
    prompts = ["The capital of France is", "def fibonacci(n):"]
    llm = LLM(model, tokenizer=tokenizer, kv_memory=0.05)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _hf_greedy(model, tokenizer.encode(prompt), 16)


@pytest.mark.slow
def test_matches_hf_on_real_qwen_coder() -> None:
    """The 32k-context evaluation model (Qwen2: q/k/v biases, tied embeddings, 2 KV heads), fetched as a user would."""
    from kvslim.models import fetch, load_model

    fetch("qwen2.5-coder-0.5b", progress=False)
    model, tokenizer = load_model("qwen2.5-coder-0.5b")
    prompts = ["def quicksort(items):", "# Parse a CSV file and"]
    llm = LLM(model, tokenizer=tokenizer, kv_memory=0.05)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _hf_greedy(model, tokenizer.encode(prompt), 16)
