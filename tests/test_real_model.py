"""On the real SmolLM2-135M-Instruct: compression keeps what matters (slow: minutes on 2 CPU cores)."""
from __future__ import annotations

import math

import pytest
import torch
from passkey_helpers import assert_keeps_pass_keys, retrieved
from transformers import DynamicCache

import kvslim
from kvslim.bench.tasks import get_task
from kvslim.cache.quantized import ChannelGroups, TokenGroups

pytestmark = pytest.mark.slow


def test_snapkv_quarter_cache_still_finds_the_pass_key(smollm2, passkeys):
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


def test_real_keys_have_outlier_channels_that_per_channel_quantization_handles(smollm2, passkeys):
    """KIVI's observation on SmolLM2's own keys: quantizing keys per channel beats per token."""
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer.encode(passkeys[0].prompt)[:1024]])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    wins = 0
    for layer in cache.layers:
        for head in layer.keys[0]:  # (T, D) keys of one KV head, in time order
            per_channel = (ChannelGroups.encode(head, 2, 32).decode() - head).norm()
            per_token = (TokenGroups.encode(head, 2, 32).decode() - head).norm()
            wins += int(per_channel < per_token)
    heads = len(cache.layers) * cache.layers[0].keys.shape[1]
    assert wins >= 0.9 * heads, f"per-channel won on {wins}/{heads} heads"
