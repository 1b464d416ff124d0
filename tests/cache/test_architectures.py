"""kvslim.Cache on every supported decoder architecture, each a tiny random config checked against the model's own
cache: Llama, Mistral, Qwen2, Qwen3 (q/k norms), Phi-3 (fused qkv), Gemma 2 (softcapping, query_pre_attn_scalar,
sliding-window layers), Gemma 3 (sliding-window layers, q/k norms) and OLMo 2. The Gemma configs, and Mistral as
``mistral-w16``, have a 16-token window, so the 40-token prompts below reach past it."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import kvslim
from kvslim.cache.quantized import QuantizedSegment
from kvslim.hf_compat import cache_arg
from kvslim.models import tiny_config, tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "olmo2", "mistral-w16"]
SLIDING = ["gemma2", "gemma3_text", "mistral-w16"]  # Gemma: layer 0 slides, layer 1 is global; Mistral: both slide
PROMPT = 40


def _model(arch: str):
    """The tiny model of ``arch``; ``mistral-w16`` is Mistral with a 16-token window (its own is 4096)."""
    if arch == "mistral-w16":
        config = tiny_config("mistral")
        config.sliding_window = 16
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return tiny_model(arch, "gqa", attn_implementation="eager" if arch == "gemma2" else "sdpa")  # Gemma 2 has no sdpa


def _ids(n: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids: torch.Tensor, cache, n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits of each step, through ``model.generate`` with ``cache``."""
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **cache_arg(cache))
    return out.sequences[0, ids.shape[1]:].tolist(), torch.cat(out.logits)


def _dynamic_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("arch", ARCHS)
def test_full_policy_is_the_models_own_cache(arch: str) -> None:
    """Same greedy tokens and logits as transformers' DynamicCache, and the same bytes (a sliding layer holds W - 1)."""
    model, ids = _model(arch), _ids()
    reference = DynamicCache(config=model.config)
    ref_tokens, ref_logits = _generate(model, ids, reference, 24)
    cache = kvslim.Cache(kvslim.policy("full"), model.config)
    tokens, logits = _generate(model, ids, cache, 24)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert cache.nbytes() == _dynamic_bytes(reference)
    assert cache.stats()["bytes_ratio"] == 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_snapkv_drops_bytes_within_each_layers_window(arch: str) -> None:
    """keep=0.5 keeps half of what the full cache holds per layer: half the prompt, or half a sliding layer's W - 1;
    decoding then runs with what is held, and a sliding layer never holds more than W - 1."""
    model = _model(arch)
    cache = kvslim.Cache(kvslim.policy("snapkv", keep=0.5, window=4), model.config)
    with torch.no_grad():
        model(_ids(), use_cache=True, **cache_arg(cache))
    for layer in cache.layers:
        full = PROMPT if layer.window is None or layer.window > PROMPT else layer.window - 1
        assert (layer.lengths == (full + 1) // 2).all()
    assert cache.stats()["bytes_ratio"] < 0.6  # ceil(half) of each layer, plus a sliding layer's recorded slots
    tokens, _ = _generate(model, _ids(), kvslim.Cache(kvslim.policy("snapkv", keep=0.5, window=4), model.config), 24)
    assert len(tokens) == 24
    assert all((layer.lengths < layer.window).all() for layer in cache.layers if layer.window)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_quantizer_packs_every_layer(arch: str) -> None:
    """int4 packs every token of every layer (a sliding layer's window included) and decoding runs on the codes."""
    model = _model(arch)
    cache = kvslim.Cache(kvslim.policy("int4"), model.config)
    ref_tokens, ref_logits = _generate(model, _ids(), DynamicCache(config=model.config), 8)
    tokens, logits = _generate(model, _ids(), cache, 8)
    assert tokens[0] == ref_tokens[0]  # the prompt is attended before it is packed
    assert not torch.allclose(logits[1:], ref_logits[1:])  # later steps read 4-bit codes
    assert all(isinstance(layer.segments[0], QuantizedSegment) for layer in cache.layers)
    assert cache.stats()["bytes_ratio"] < 0.4  # 4-bit codes plus fp16 scales vs float32


@pytest.mark.parametrize("arch", SLIDING)
def test_chunked_prefill_sees_only_each_querys_window(arch: str) -> None:
    """Chunks after the first are attended by kvslim's own mask: it must apply each query's window."""
    model, ids = _model(arch), _ids(60)
    bounds = [0, 20, 45, 50, *range(51, 60)]
    caches = [DynamicCache(config=model.config), kvslim.Cache(kvslim.policy("full"), model.config)]
    logits = [[], []]
    with torch.no_grad():
        for a, b in zip(bounds, bounds[1:]):
            for out, cache in zip(logits, caches):
                out.append(model(ids[:, a:b], use_cache=True, **cache_arg(cache)).logits)
    torch.testing.assert_close(torch.cat(logits[1], 1), torch.cat(logits[0], 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", SLIDING)
@pytest.mark.parametrize("name", ["snapkv", "h2o", "streaming"])
def test_decoding_after_eviction_attends_exactly_what_is_held(arch: str, name: str) -> None:
    """Each step's logits equal a plain cache filled with what kvslim holds, every token attended (explicit true
    positions): what a sliding layer holds is always inside the next query's window, global layers hold the rest.
    A plain cache cannot hold heads of different lengths (window expiry can leave them so): those steps only run.
    """
    model, ids = _model(arch), _ids()
    params = {"budget": 8, "sinks": 2} if name == "streaming" else {"keep": 0.5, "window": 4}
    cache = kvslim.Cache(kvslim.policy(name, **params), model.config)
    # Gemma takes one mask per layer type (None: attend everything held); Mistral's mask, built for its layer 0, fits
    # its layer 1 only while both hold as many tokens
    per_type = {"full_attention": None, "sliding_attention": None} if arch.startswith("gemma") else None
    compared = 0
    with torch.no_grad():
        token = model(ids, use_cache=True, **cache_arg(cache)).logits[:, -1:].argmax(-1)
        for step in range(30):
            reference = DynamicCache()
            for i, layer in enumerate(cache.layers):
                reference.update(*layer.dense(torch.float32)[:2], i)
            counts = torch.cat([layer.lengths.flatten() for layer in cache.layers])
            uniform = all(bool((layer.lengths == layer.lengths.max()).all()) for layer in cache.layers)
            uniform = uniform and (per_type is not None or bool((counts == counts[0]).all()))
            out = model(token, use_cache=True, **cache_arg(cache))
            if uniform:
                position = torch.tensor([[PROMPT + step]])
                ref = model(token, position_ids=position, attention_mask=per_type, use_cache=True,
                            **cache_arg(reference))
                torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
                compared += 1
            token = out.logits[:, -1:].argmax(-1)
            assert all((layer.lengths <= 15).all() for layer in cache.layers if layer.window)
    assert compared >= 10


@pytest.mark.parametrize("name", ["full", "snapkv"])
def test_left_padded_batch_matches_one_by_one_on_sliding_layers(name: str) -> None:
    """Padding is not stored and the window counts the same tokens whatever the padding (prompts of 31 to 64)."""
    model, gen = _model("gemma3_text"), torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (50, 31, 64)]
    params = {} if name == "full" else {"keep": 0.5, "window": 4}
    batch, _, _ = kvslim.generate_ids(model, prompts, name, max_new_tokens=12, **params)
    for prompt, got in zip(prompts, batch):
        assert got == kvslim.generate_ids(model, [prompt], name, max_new_tokens=12, **params)[0][0]


@pytest.mark.parametrize("name", ["streaming", "h2o"])
def test_sliding_layer_knows_the_slot_of_every_held_token(name: str) -> None:
    """After eviction and window expiry, the slots the layer records are those of the tokens it holds: layer 0's
    keys depend only on token and position, so a full run's keys identify them."""
    model, ids = _model("gemma3_text"), _ids(70)
    params = {"budget": 6, "sinks": 2} if name == "streaming" else {"budget": 6, "window": 2}
    cache = kvslim.Cache(kvslim.policy(name, **params), model.config)
    with torch.no_grad():
        model(ids[:, :30], use_cache=True, **cache_arg(cache))
        for t in range(30, 70):
            model(ids[:, t : t + 1], use_cache=True, **cache_arg(cache))
    full = DynamicCache()
    with torch.no_grad():
        model(ids, use_cache=True, **cache_arg(full))
    layer = cache.layers[0]
    keys, _, valid = layer.dense(torch.float32)
    slots = layer.tracker.column_slots(valid, layer.lengths, layer.seen).long()
    assert layer.tracker.slots is not None  # eviction left gaps: the slots are recorded, not implied
    assert valid.all() and (slots > 70 - 16).all()
    expected = full.layers[0].keys.gather(2, slots[..., None].expand_as(keys))
    torch.testing.assert_close(keys, expected, rtol=0, atol=1e-6)


def test_softcapping_matches_gemma2s_eager_attention() -> None:
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from kvslim.cache.attention import eager_attention, masked_attention

    gen = torch.Generator().manual_seed(0)
    query, keys, values = (torch.randn(1, h, 12, 16, generator=gen) * 3 for h in (4, 2, 2))
    module = torch.nn.Module()
    module.num_key_value_groups, module.head_dim = 2, 16
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    additive = torch.zeros(1, 1, 12, 12).masked_fill(~causal, torch.finfo(torch.float32).min)
    expected = eager_attention_forward(module, query, keys, values, additive, scaling=0.25, softcap=2.0)[0]
    capped = eager_attention(module, query, keys, values, additive, scaling=0.25, softcap=2.0)[0]
    uncapped = eager_attention(module, query, keys, values, additive, scaling=0.25)[0]
    torch.testing.assert_close(capped, expected)
    assert not torch.allclose(uncapped, expected, atol=1e-3)  # the cap matters at these logits
    allowed = causal.expand(1, 2, 12, 12)
    for impl in ("sdpa", "eager"):
        torch.testing.assert_close(masked_attention(query, keys, values, allowed, 0.25, impl, softcap=2.0), expected)


@pytest.mark.parametrize("model_type, what", [
    ("t5", "encoder-decoder"),
    ("jamba", "Mamba"),
    ("qwen3_next", "linear_attention"),
    ("llama4_text", "chunked_attention"),
    ("deepseek_v3", "latent attention"),
])
def test_unsupported_architectures_are_refused_naming_the_supported_ones(model_type: str, what: str) -> None:
    with pytest.raises(ValueError, match=f"(?s)Llama, Mistral, Qwen2, Qwen3.*{what}"):
        kvslim.Cache(kvslim.policy("full"), AutoConfig.for_model(model_type))


def test_attention_with_learned_sinks_is_refused() -> None:
    """gpt-oss passes per-head sink logits (``s_aux``) to its attention, which kvslim's attention does not add."""
    config = AutoConfig.for_model("gpt_oss", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, intermediate_size=64, vocab_size=256,
                                  num_local_experts=2, num_experts_per_tok=1, sliding_window=16, dtype="float32")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    cache = kvslim.Cache(kvslim.policy("full"), model.config)
    with pytest.raises(ValueError, match="Llama, Mistral.*learned sinks"), torch.no_grad():
        model(torch.ones(1, 8, dtype=torch.long), use_cache=True, **cache_arg(cache))


def test_recorded_slots_are_counted_in_the_bytes_held() -> None:
    """Once eviction leaves gaps in a sliding layer, its slot record is memory the cache holds: 4 bytes per token/head."""
    model = _model("gemma3_text")
    _, cache, _ = kvslim.generate_ids(model, [_ids()[0].tolist()], "h2o", max_new_tokens=30, keep=0.5, window=4)
    layer = cache.layers[0]
    assert layer.tracker.slots is not None and layer.tracker.slots.dtype == torch.int32
    storage = sum(seg.nbytes() for seg in layer.segments)
    assert layer.nbytes() == storage + layer.tracker.slots.numel() * 4
    stats = cache.stats()
    assert stats["nbytes"] == stats["device_nbytes"] == cache.bytes_per_sequence()[0] == cache.nbytes()
