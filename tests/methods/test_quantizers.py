"""Quantizing methods: the bytes they promise (``storage_bytes``) are the bytes they hold, and they generate."""
from __future__ import annotations

import pytest
import torch

import kvslim
from kvslim.cache.layer import LayerKV
from kvslim.cache.quantized import QuantizedSegment
from kvslim.cache.segments import DenseSegment
from kvslim.methods.quantizers import Quantizer
from kvslim.shape import KVShape

# bytes relative to bf16 at 4096 tokens, head_dim 128, 8 KV heads (the acceptance figures)
ACCEPTANCE = [
    ("kivi2", 0.22),
    ("kivi2(group=128)", 0.17),
    ("kivi4", 0.34),
    ("int8", 0.53),
    ("fp8", 0.52),
    ("int4", 0.32),
]


def one_layer(tokens: int, heads: int = 8, dim: int = 128, batch: int = 1) -> LayerKV:
    gen = torch.Generator().manual_seed(0)
    layer = LayerKV(0)
    layer.append(torch.randn(batch, heads, tokens, dim, generator=gen).bfloat16(),
                 torch.randn(batch, heads, tokens, dim, generator=gen).bfloat16())
    return layer


@pytest.mark.parametrize(("spec", "ratio"), ACCEPTANCE)
def test_acceptance_ratios_analytic_and_real(spec: str, ratio: float) -> None:
    method = kvslim.policy(spec)
    shape = KVShape(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    analytic = method.expected_bytes(shape, 4096) / (shape.bytes_per_token * 4096)
    assert analytic <= ratio
    layer = one_layer(4096)
    full = layer.nbytes()
    method.store(layer)
    assert isinstance(layer.segments[0], QuantizedSegment)
    assert layer.nbytes() / full == pytest.approx(analytic, abs=0)
    one = KVShape(num_layers=1, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    assert method.storage_bytes(one, [4096]) == layer.nbytes()


@pytest.mark.parametrize("spec", ["kivi2", "kivi4(group=64,residual=32)", "int8(residual=5)", "int4", "fp8"])
def test_store_keeps_residual_and_time_order(spec: str) -> None:
    method = kvslim.policy(spec)
    layer = one_layer(300, heads=2, dim=32)
    keys, values, _ = layer.dense(torch.bfloat16)
    method.store(layer)
    packed = method.packed_tokens(300)
    assert [s.tokens for s in layer.segments] == [2 * packed] + ([2 * (300 - packed)] if packed < 300 else [])
    assert 300 - packed < method.residual + method.block()
    k, v, _ = layer.dense(torch.bfloat16)
    assert torch.equal(k[:, :, packed:], keys[:, :, packed:])  # the residual is untouched, last
    assert (k[:, :, :packed].float() - keys[:, :, :packed].float()).abs().mean() < 0.5
    method.store(layer)  # nothing more to move: storage unchanged
    assert len(layer.segments) == (2 if packed < 300 else 1)


def test_decode_steps_merge_into_one_packed_segment() -> None:
    method = kvslim.policy("kivi2(group=4,residual=4)")
    layer = one_layer(10, heads=2, dim=16)
    method.store(layer)
    for _ in range(9):
        layer.append(torch.randn(1, 2, 1, 16).bfloat16(), torch.randn(1, 2, 1, 16).bfloat16())
        method.store(layer)
        assert sum(isinstance(s, QuantizedSegment) for s in layer.segments) == 1
        assert len(layer.segments) <= 3
    assert layer.lengths.tolist() == [[19, 19]]
    assert layer.segments[0].tokens == 2 * 12


def test_per_token_state_follows_its_token_on_ragged_layers() -> None:
    """An evictor's per-token scores (H2O) stay on their tokens when a quantizer re-lays the layer."""
    layer = LayerKV(0)
    ids = torch.arange(1, 13, dtype=torch.float32).expand(2, 2, 12)
    keys = torch.zeros(2, 2, 12, 16)
    keys[..., 0] = ids
    keep = torch.arange(12) < torch.tensor([[12, 7], [3, 9]]).unsqueeze(-1)
    layer.segments = [DenseSegment.from_padded(keys, keys.clone(), keep)]
    layer.append(torch.full((2, 2, 1, 16), 0.0), torch.zeros(2, 2, 1, 16))
    layer.segments[-1].keys[:, 0] = 13.0  # the newest token's id
    score = layer.dense(torch.float32)[0][..., 0].clone()
    layer.state["score"] = score
    kvslim.policy("int8(residual=3)").store(layer)
    k, _, valid = layer.dense(torch.float32)
    assert layer.state["score"].shape == valid.shape
    assert torch.allclose(layer.state["score"][valid], k[..., 0][valid], atol=0.05)


def test_hybrids_take_one_quantizer_last() -> None:
    assert kvslim.policy("snapkv+kivi2", keep=0.25).spec.endswith("kivi2(group=32,residual=128)")
    with pytest.raises(ValueError, match="comes last: write e.g. 'h2o\\+kivi2'"):
        kvslim.policy("kivi2+h2o", keep=0.5)
    with pytest.raises(ValueError, match="one quantizer"):
        kvslim.policy("kivi2+int8")


def test_invalid_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="residual"):
        kvslim.policy("int8(residual=-1)")
    with pytest.raises(ValueError, match="group"):
        kvslim.policy("kivi2(group=0)")


SPECS = [
    "kivi2(group=8,residual=16)",
    "kivi4(group=8,residual=16)",
    "int8",
    "int4(group=8)",
    "fp8",
    "snapkv(keep=0.5,window=8)+kivi2(group=8,residual=8)",
    "h2o(keep=0.5,window=8)+int8",
    "streaming(keep=0.5)+kivi4(group=8,residual=8)",
]


@pytest.mark.parametrize("spec", SPECS)
def test_generates_through_kvslim_cache(llama, spec: str) -> None:
    """A batch of two prompts of different lengths, so every (sequence, head) is ragged somewhere."""
    prompt = torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    mask[1, :7] = 0
    cache = kvslim.Cache(kvslim.policy(spec), llama.config)
    out = llama.generate(prompt, attention_mask=mask, past_key_values=cache, max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (2, 46)
    assert all(isinstance(layer.segments[0], QuantizedSegment) for layer in cache.layers)
    stats = cache.stats()
    assert stats["bytes_ratio"] < 0.7
    assert len(cache.bytes_per_sequence()) == 2


@pytest.mark.parametrize("spec", ["kivi2(group=8,residual=16)", "kivi4(group=16,residual=8)", "int8", "int4(group=8)",
                                  "fp8", "snapkv(keep=0.5,window=8)+kivi2(group=8,residual=8)"])
def test_storage_bytes_matches_nbytes_after_generate(llama, prompt, spec: str) -> None:
    policy = kvslim.policy(spec)
    cache = kvslim.Cache(policy, llama.config)
    llama.generate(prompt, past_key_values=cache, max_new_tokens=5, do_sample=False, pad_token_id=0)
    held = [float(layer.lengths[0, 0]) for layer in cache.layers]
    assert all(bool((layer.lengths == layer.lengths[0, 0]).all()) for layer in cache.layers)
    assert policy.storage_bytes(KVShape.from_config(llama.config), held) == cache.nbytes()


def test_int8_decoding_matches_the_full_cache(llama, prompt) -> None:
    """Prefill attends in full precision; the next step's logits over int8 storage barely move."""
    logits = {}
    for spec in ("full", "int8", "kivi2(group=8,residual=0)"):
        cache = kvslim.Cache(kvslim.policy(spec), llama.config)
        with torch.no_grad():
            llama(prompt, past_key_values=cache)
            logits[spec] = llama(prompt[:, -1:], past_key_values=cache).logits[0, -1]
    scale = logits["full"].abs().max()
    assert (logits["int8"] - logits["full"]).abs().max() < 0.01 * scale
    assert (logits["kivi2(group=8,residual=0)"] - logits["full"]).abs().max() < 0.5 * scale


def test_quantizers_are_registered() -> None:
    for name in ("kivi2", "kivi4", "int8", "int4", "fp8"):
        assert isinstance(kvslim.policy(name), Quantizer)
        assert name in kvslim.METHODS
