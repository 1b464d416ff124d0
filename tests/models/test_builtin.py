"""Built-in models: presets, config loading, tiny random models and the real SmolLM2 (its load marked slow)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from kvslim.models import (
    PACKAGED, PRESETS, TINY_ARCHS, TINY_MODELS, load_config, load_model, load_smollm2, tiny_config, tiny_model,
)
from kvslim.models import packaged
from kvslim.models.convert import write_atomically
from kvslim.shape import KVShape


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the kvslim cache at an empty directory so tests never see (or write) the user's cache."""
    monkeypatch.setenv("KVSLIM_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("name", "geometry"),
    [
        ("llama-3.1-8b", (32, 32, 8, 128)),
        ("llama-3.1-70b", (80, 64, 8, 128)),
        ("qwen2.5-7b", (28, 28, 4, 128)),
        ("qwen2.5-0.5b", (24, 14, 2, 64)),
        ("mistral-7b", (32, 32, 8, 128)),
        ("smollm2-135m", (30, 9, 3, 64)),
    ],
)
def test_preset_kv_geometry(name: str, geometry: tuple[int, int, int, int]) -> None:
    shape = KVShape.from_config(load_config(name))
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim) == geometry
    assert shape.attention == "GQA"


@pytest.mark.parametrize(
    ("name", "model_type", "params"),
    [
        # Published parameter counts: a check on every width, vocab size and tying flag in the presets.
        ("llama-3.1-8b", "llama", 8_030_261_248),
        ("llama-3.1-70b", "llama", 70_553_706_496),
        ("qwen2.5-7b", "qwen2", 7_615_616_512),
        ("qwen2.5-0.5b", "qwen2", 494_032_768),
        ("mistral-7b", "mistral", 7_241_732_096),
    ],
)
def test_preset_models_match_published_parameter_counts(name: str, model_type: str, params: int) -> None:
    model, tokenizer = load_model(name, device="meta")  # meta: count parameters without allocating them
    assert tokenizer is None
    assert model.config.model_type == model_type
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == params


def test_llama_preset_rope() -> None:
    config = load_config("llama-3.1-8b")
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.max_position_embeddings == 131072
    assert load_config("smollm2-135m").tie_word_embeddings is True


def test_presets_are_not_mutated_by_loading() -> None:
    before = json.dumps(PRESETS, sort_keys=True)
    load_config("qwen2.5-7b").num_hidden_layers = 1
    assert json.dumps(PRESETS, sort_keys=True) == before


def test_load_config_from_file_and_directory(tmp_path: Path) -> None:
    tiny_config("mistral", "mqa").save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "config.json"):
        config = load_config(str(source))
        assert config.model_type == "mistral"
        assert KVShape.from_config(config).attention == "MQA"


def test_load_config_reads_legacy_keys(tmp_path: Path) -> None:
    """Config files written by transformers 4.x use rope_theta and torch_dtype at top level."""
    values = dict(PRESETS["qwen2.5-7b"], torch_dtype="float16")
    del values["dtype"], values["rope_parameters"]
    values["rope_theta"] = 1000000.0
    path = tmp_path / "qwen.json"
    path.write_text(json.dumps(values))
    config = load_config(str(path))
    assert config.rope_parameters["rope_theta"] == 1000000.0
    assert KVShape.from_config(config).dtype == torch.float16


def test_load_config_unknown_lists_names_and_paths() -> None:
    with pytest.raises(ValueError) as err:
        load_config("llama-9")
    message = str(err.value)
    assert all(name in message for name in PRESETS)
    assert "config.json" in message


@pytest.mark.parametrize(("text", "problem"), [("{not json", "not valid JSON"), ('{"hidden_size": 8}', "model_type")])
def test_load_config_bad_file(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        load_config(str(path))


@pytest.mark.parametrize(("attention", "kv_heads", "kind"), [("mha", 4, "MHA"), ("gqa", 2, "GQA"), ("mqa", 1, "MQA")])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_config(arch: str, attention: str, kv_heads: int, kind: str) -> None:
    config = tiny_config(arch, attention)
    shape = KVShape.from_config(config)
    assert config.model_type == arch
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (2, 4, kv_heads, 16)
    assert shape.attention == kind
    assert shape.dtype == torch.float32
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (64, 128, 256)
    assert config.max_position_embeddings == 4096


@pytest.mark.parametrize(("arch", "attention"), [("gpt2", "gqa"), ("llama", "mla")])
def test_tiny_config_rejects_unknown(arch: str, attention: str) -> None:
    with pytest.raises(ValueError, match="use one of"):
        tiny_config(arch, attention)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_models_run_and_cache_kv(name: str) -> None:
    model, tokenizer = load_model(name)
    assert tokenizer is None
    assert not model.training
    shape = KVShape.from_config(model.config)
    with torch.no_grad():
        out = model(torch.arange(10)[None], use_cache=True)
    assert out.logits.shape == (1, 10, 256)
    keys = out.past_key_values.layers[0].keys
    assert keys.shape == (1, shape.num_kv_heads, 10, shape.head_dim)


def test_tiny_model_is_seeded() -> None:
    a, b, c = tiny_model(seed=1), tiny_model(seed=1), tiny_model(seed=2)
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


def test_load_model_dtype_and_attn_implementation() -> None:
    model, _ = load_model("tiny-qwen2", dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_load_model_unknown_lists_names() -> None:
    with pytest.raises(ValueError, match="tiny-llama.*") as err:
        load_model("gpt-5")
    assert "smollm2-135m" in str(err.value)


def test_interrupted_conversion_leaves_no_cache(cache: Path) -> None:
    def interrupted(staging: Path) -> None:
        (staging / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(cache / "model", interrupted)
    assert list(cache.iterdir()) == []


@pytest.mark.slow
def test_smollm2_generates_and_caches(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = load_smollm2()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in PACKAGED["smollm2-135m"].converted.iterdir()}
    assert KVShape.from_config(model.config) == KVShape(30, 9, 3, 64, torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def no_conversion(path: Path, target: Path) -> None:
        raise AssertionError("second load must come from the cache, not the GGUF")

    monkeypatch.setattr(packaged, "convert_gguf", no_conversion)
    start = time.perf_counter()
    again, _ = load_smollm2()
    assert time.perf_counter() - start < 10
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
