"""lowrank(rank=R): per-head prefill bases, rank-R coefficients stored; exact at rank=head_dim, bytes by formula."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, DynamicCache

import kvslim
from kvslim.engine import LLM
from kvslim.methods.lowrank import LowRankSegment, principal_basis, scaled_basis
from kvslim.models.tiny import tiny_config


def _prefill(model, ids, policy) -> kvslim.Cache:
    cache = kvslim.Cache(policy, model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


def test_full_rank_is_the_full_cache(model, prompt):
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else \
        model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        ref = model(prompt, past_key_values=DynamicCache(config=model.config), use_cache=True)
        cache = kvslim.Cache(kvslim.policy(f"lowrank(rank={head_dim})"), model.config)
        out = model(prompt, past_key_values=cache, use_cache=True)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
        ref_cache, token = ref.past_key_values, ref.logits[:, -1:].argmax(-1)
        for _ in range(3):  # decoded tokens are projected onto the (complete) prefill basis
            ref = model(token, past_key_values=ref_cache, use_cache=True)
            out = model(token, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
            token = ref.logits[:, -1:].argmax(-1)
    assert all(isinstance(s, LowRankSegment) for layer in cache.layers for s in layer.segments)
    assert max(max(e.values()) for e in cache.stats()["reconstruction_error"]) < 1e-5


@pytest.mark.parametrize("spec", ["lowrank(rank=4)", "snapkv(window=8,keep=0.25)+lowrank(rank=4)",
                                  "lowrank(rank=4,bits=8)", "lowrank(rank=4,bits=4)"])
def test_bytes_are_coefficients_and_bases(llama, prompt, spec):
    policy = kvslim.policy(spec)
    cache = _prefill(llama, prompt, policy)
    shape, rank = cache.shape, 4
    tokens = prompt.shape[1] if "keep" not in spec else math.ceil(prompt.shape[1] * 0.25)
    # per token and head: rank key and rank value coefficients, in the model dtype or as codes + fp16 scale and zero
    bits = int(spec.split("bits=")[1][0]) if "bits=" in spec else None
    coef = rank * shape.element_bytes if bits is None else rank * bits // 8 + 4
    # and each token's RoPE position (int32)
    per_layer = shape.num_kv_heads * (tokens * (2 * coef + 4) + 2 * shape.head_dim * rank * shape.element_bytes)
    assert cache.nbytes() == shape.num_layers * per_layer == policy.expected_bytes(shape, prompt.shape[1])
    assert cache.nbytes() < _prefill(llama, prompt, kvslim.policy("full")).nbytes()
    with torch.no_grad():  # a decoded token adds 2 x rank coefficients and a position per head
        llama(prompt[:, -1:], past_key_values=cache, use_cache=True)
    assert cache.nbytes() == shape.num_layers * (per_layer + shape.num_kv_heads * (2 * coef + 4))


def test_quantized_coefficients_stay_close(llama, prompt):
    """8-bit coefficients reconstruct the same keys/values as model-dtype coefficients, to within their step."""
    exact = _prefill(llama, prompt, kvslim.policy("lowrank(rank=8)"))
    packed = _prefill(llama, prompt, kvslim.policy("lowrank(rank=8,bits=8)"))
    for a, b in zip(exact.layers, packed.layers):
        ka, va, _ = a.dense(torch.float32)
        kb, vb, _ = b.dense(torch.float32)
        assert (ka - kb).norm() < 0.02 * ka.norm() and (va - vb).norm() < 0.02 * va.norm()


def test_decode_time_eviction_drops_coefficient_rows(llama, prompt):
    cache = _prefill(llama, prompt, kvslim.policy("rkv(budget=32,window=4)+lowrank(rank=4,bits=4)"))
    token = prompt[:, -1:]
    with torch.no_grad():
        for _ in range(5):
            token = llama(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    assert all((layer.lengths == 32).all() for layer in cache.layers)
    assert all(isinstance(s, LowRankSegment) for layer in cache.layers for s in layer.segments)


def test_error_decreases_with_rank(llama, prompt):
    errors = []
    for rank in (1, 2, 4, 8):
        stats = _prefill(llama, prompt, kvslim.policy(f"lowrank(rank={rank})")).stats()["reconstruction_error"]
        errors.append(sum(e["keys"] + e["values"] for e in stats))
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_refusals(llama, prompt):
    with pytest.raises(ValueError, match="at most head_dim"):
        _prefill(llama, prompt, kvslim.policy("lowrank(rank=4096)"))
    with pytest.raises(ValueError, match="positive"):
        kvslim.policy("lowrank(rank=0)")
    with pytest.raises(ValueError, match="must be None"):
        kvslim.policy("lowrank(rank=4,bits=2)")
    with pytest.raises(ValueError, match="must be even"):
        kvslim.policy("lowrank(rank=5,bits=4)")
    with pytest.raises(ValueError, match="comes last"):
        kvslim.policy("lowrank(rank=4)+kivi4")
    with pytest.raises(ValueError, match="use kvslim.Cache for lowrank"):
        LLM(llama, policy="snapkv(keep=0.25)+lowrank(rank=4)", kv_memory=0.01)


@pytest.mark.parametrize("spec", ["lowrank(rank=16)", "lowrank(rank=32)", "lowrank(rank=16,bits=4)",
                                  "lowrank(rank=32,bits=4)"])
def test_bfloat16_prefill_decode_and_suffix(spec):
    """bf16 models (the GPU benchmarks): the float32 eigen-decomposition meets bf16 bases and coefficients."""
    config = tiny_config("qwen2", "gqa")
    config.head_dim = 64  # Qwen2.5-Coder-0.5B's, so rank=32 is allowed
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    prompt = torch.randint(1, 256, (1, 96), generator=torch.Generator().manual_seed(1))
    cache = _prefill(model, prompt, kvslim.policy(spec))
    token = prompt[:, -1:]
    with torch.no_grad():
        for _ in range(3):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        with cache.appended():  # a question after the compressed context (RULER's query-agnostic protocol)
            model(prompt[:, :12], past_key_values=cache, use_cache=True)
        logits = model(token, past_key_values=cache, use_cache=True).logits  # decoding after it stores it too
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert all((layer.lengths == 96 + 3 + 12 + 1).all() for layer in cache.layers)
    assert all(isinstance(s, LowRankSegment) for layer in cache.layers for s in layer.segments)
    assert all(layer.state["lowrank"][0].dtype == torch.bfloat16 for layer in cache.layers)
    assert 0 < max(max(e.values()) for e in cache.stats()["reconstruction_error"]) < 1


def _low_rank_projections(model, rank: int) -> None:
    """Make every layer's keys and values (before RoPE) span ``rank`` directions per KV head, bias included."""
    torch.manual_seed(2)
    for layer in model.model.layers:
        attn = layer.self_attn
        for proj in (attn.k_proj, attn.v_proj):
            heads = proj.out_features // attn.head_dim
            with torch.no_grad():
                for h in range(heads):
                    rows = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
                    basis = torch.linalg.qr(torch.randn(attn.head_dim, rank))[0]  # (D, rank)
                    proj.weight[rows] = basis @ torch.randn(rank, proj.in_features) * 0.3
                    if proj.bias is not None:
                        proj.bias[rows] = basis @ torch.randn(rank)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("evictor", ["", "snapkv(keep=0.5,window=4)+", "adakv(keep=0.5,window=4)+"])
def test_keys_low_rank_before_rope_are_stored_exactly(arch, evictor):
    """Keys are low-rank *before* RoPE: rotating each position by its own angles spreads a rank-R key set over up to
    2R directions, so a basis fit to rotated keys lost the needle on RULER-4k (Qwen2.5-0.5B, rank 32: 0/8 answers,
    post-RoPE key error 0.14 vs 0.02 pre-RoPE). Rank-4 keys and values of a padded batch must come back exactly,
    also after an evictor (the positions of the tokens it kept are recorded before it acts, not read off ranks)."""
    model = AutoModelForCausalLM.from_config(tiny_config(arch, "gqa")).eval()
    _low_rank_projections(model, 4)
    prompts = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (200, 160)]
    from kvslim.generate import generate_ids

    full, _, _ = generate_ids(model, prompts, evictor.rstrip("+") or "full", max_new_tokens=8)
    low, cache, _ = generate_ids(model, prompts, f"{evictor}lowrank(rank=4)", max_new_tokens=8)
    assert low == full
    assert max(max(e.values()) for e in cache.stats()["reconstruction_error"]) < 1e-4
    if evictor:
        return
    keys = [layer.dense(torch.float32)[0] for layer in cache.layers]
    with torch.no_grad():  # and the stored keys are the model's rotated ones: the same logits as the full cache
        ref = DynamicCache(config=model.config)
        model(torch.tensor([prompts[0]]), past_key_values=ref, use_cache=True)
    torch.testing.assert_close(keys[0][0, :, :200], ref.layers[0].keys[0], rtol=1e-4, atol=1e-4)


def test_four_bit_coefficients_keep_small_components():
    """Components whose spreads differ 50-fold each keep a usable precision at bits=4: the basis' columns carry the
    square root of each component's spread, so a token's small coefficients are not rounded to its zero point as
    they are under one per-token scale over the raw coefficients (the orthonormal basis)."""
    gen = torch.Generator().manual_seed(0)
    spread = torch.tensor([100.0, 50.0, 30.0, 20.0, 10.0, 5.0, 3.0, 2.0])
    directions = torch.linalg.qr(torch.randn(8, 8, generator=gen))[0]
    coef = torch.randn(1, 1, 256, 8, generator=gen) * spread
    rows, valid = coef @ directions.T, torch.ones(1, 1, 256, dtype=torch.bool)
    basis = principal_basis(rows, valid, 8)

    def component_errors(stored_basis: Tensor) -> Tensor:
        seg = LowRankSegment.project(rows, rows, torch.zeros(1, 1, 256), valid, stored_basis, stored_basis, None, 4)
        keys, _, _ = seg.dense()
        exact, back = rows @ basis, keys @ basis  # per component
        return (back - exact).norm(dim=-2) / exact.norm(dim=-2)

    assert component_errors(scaled_basis(rows, valid, basis)).max() < 0.3  # measured 0.02 to 0.23
    assert component_errors(basis).max() > 1  # measured 0.01 on the largest, 0.45 to 1.24 on the last three
