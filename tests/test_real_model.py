"""On the real SmolLM2-135M-Instruct: compression keeps what matters (slow: minutes on 2 CPU cores)."""
from __future__ import annotations

import math

import pytest
import torch
from passkey_helpers import assert_keeps_pass_keys, retrieved
from transformers import DynamicCache

import kvslim
from kvslim.bench.tasks import get_task
from kvslim.cache.quantized import ChannelGroups, Float8, TokenGroups

pytestmark = pytest.mark.slow


def test_snapkv_quarter_cache_still_finds_the_pass_key(smollm2, passkeys):
    """Issue #2's acceptance: >= 9 of 10 prompts that the full cache answers (window 32, max pooling).

    With a 64-token window SnapKV found only 7 of 10: filler tokens in the window outvote the question.
    """
    hits = retrieved(smollm2, passkeys, "snapkv", keep=0.25)
    assert_keeps_pass_keys(hits, "snapkv keep=0.25")


def test_kivi4_finds_the_pass_key(smollm2, passkeys):
    hits = retrieved(smollm2, passkeys, "kivi4")
    assert_keeps_pass_keys(hits, "kivi4")


def _perplexity(model, ids: torch.Tensor, policy: str, prefix: int, chunk: int) -> float:
    """Perplexity of ``ids[prefix:]``: the prefix is one prompt pass (then compressed), the rest is fed in
    chunks, each attending to the compressed cache, and scored on its next-token predictions."""
    cache = kvslim.Cache(kvslim.policy(policy), model.config)
    nll, count = 0.0, 0
    with torch.no_grad():
        logits = model(ids[:, :prefix], past_key_values=cache, use_cache=True).logits[:, -1:]
        for start in range(prefix, ids.shape[1], chunk):
            piece = ids[:, start : start + chunk]
            pred = torch.cat([logits, model(piece, past_key_values=cache, use_cache=True).logits], 1)
            nll += torch.nn.functional.cross_entropy(pred[0, :-1], piece[0], reduction="sum").item()
            count += piece.shape[1]
            logits = pred[:, -1:]
    return math.exp(nll / count)


def test_kivi4_perplexity_within_one_percent_of_full(smollm2):
    """Text: the Python reference documentation shipped with CPython (pydoc_data.topics)."""
    model, tokenizer = smollm2
    text = get_task("perplexity").generate(1, 1024, tokenizer, seed=0)[0].prompt
    ids = torch.tensor([tokenizer.encode(text)])
    full = _perplexity(model, ids, "full", 512, 64)
    kivi4 = _perplexity(model, ids, "kivi4", 512, 64)
    kivi2 = _perplexity(model, ids, "kivi2", 512, 64)
    print(f"perplexity full {full:.3f}  kivi4 {kivi4:.3f} ({kivi4 / full - 1:+.2%})  kivi2 {kivi2:.3f} ({kivi2 / full - 1:+.2%})")
    assert kivi4 <= full * 1.01
    assert kivi2 < full * 1.5  # reported, loosely bounded: 2-bit costs more


@pytest.fixture(scope="module")
def real_kv(smollm2):
    """SmolLM2's own keys and values of a 1k-token prompt: (layers x heads) of (T, D) rows in time order."""
    model, tokenizer = smollm2
    sample = get_task("needle").generate(1, 1024, tokenizer, seed=0)[0]
    ids = torch.tensor([tokenizer.encode(sample.prompt)[:992]])  # whole 32-token groups
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    keys = [head for layer in cache.layers for head in layer.keys[0]]
    values = [head for layer in cache.layers for head in layer.values[0]]
    return keys, values


FORMATS = {  # name: (key codec, value codec, bound on the relative error of keys and values)
    "kivi2": (lambda x: ChannelGroups.encode(x, 2, 32), lambda x: TokenGroups.encode(x, 2, 32), 0.6),
    "kivi4": (lambda x: ChannelGroups.encode(x, 4, 32), lambda x: TokenGroups.encode(x, 4, 32), 0.12),
    "int4": (lambda x: TokenGroups.encode(x, 4, 32), lambda x: TokenGroups.encode(x, 4, 32), 0.15),
    "int8": (lambda x: TokenGroups.encode(x, 8, 64), lambda x: TokenGroups.encode(x, 8, 64), 0.01),
    "fp8": (Float8.encode, Float8.encode, 0.08),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_reconstruction_error_on_real_keys_and_values(real_kv, name):
    encode_k, encode_v, bound = FORMATS[name]
    keys, values = real_kv
    err_k = sum((encode_k(k).decode() - k).norm() ** 2 for k in keys) ** 0.5 / sum(k.norm() ** 2 for k in keys) ** 0.5
    err_v = sum((encode_v(v).decode() - v).norm() ** 2 for v in values) ** 0.5 / sum(v.norm() ** 2 for v in values) ** 0.5
    print(f"{name}: relative error keys {err_k:.4f} values {err_v:.4f}")
    assert err_k < bound and err_v < bound


@pytest.mark.parametrize("spec", ["kivi2", "kivi4", "int8", "int4", "fp8", "snapkv+kivi4"])
def test_every_quantizer_generates_on_the_real_model(smollm2, spec):
    model, tokenizer = smollm2
    params = {"keep": 0.5} if spec.startswith("snapkv") else {}
    prompt = "Explain in one sentence why the sky is blue. " * 12  # > one 32-token group past the residual
    full = kvslim.generate(model, tokenizer, [prompt], "full", max_new_tokens=16, chat=True)[0]
    out = kvslim.generate(model, tokenizer, [prompt], spec, max_new_tokens=16, chat=True, **params)[0]
    print(f"{spec}: {out.text!r} (full: {full.text!r}), {out.compression:.2f}x smaller")
    assert out.new_tokens > 0 and out.text.strip()
    assert out.kv_bytes_end < full.kv_bytes_end


def test_real_keys_have_outlier_channels_that_per_channel_quantization_handles(real_kv):
    """KIVI's observation on SmolLM2's own keys: quantizing keys per channel beats per token."""
    keys, _ = real_kv
    wins = sum(int((ChannelGroups.encode(k, 2, 32).decode() - k).norm() < (TokenGroups.encode(k, 2, 32).decode() - k).norm())
               for k in keys)
    assert wins >= 0.9 * len(keys), f"per-channel won on {wins}/{len(keys)} heads"
