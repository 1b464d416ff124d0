"""One resolver for every --model: built-in names, model directories, GGUF files, the local hub cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvslim.models import hub, load_config, load_model, resolve
from kvslim.shape import KVShape
from model_dirs import save_hub_snapshot, save_model_dir


@pytest.fixture(autouse=True)
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """kvslim's cache and the hub cache point at empty directories: tests never read or write the user's."""
    monkeypatch.setenv("KVSLIM_CACHE", str(tmp_path / "kvslim"))
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


@pytest.mark.parametrize(("spec", "kind"), [
    ("smollm2-135m", "packaged"), ("qwen2.5-coder-0.5b", "packaged"), ("llama-3.1-8b", "preset"),
    ("tiny-qwen2", "tiny"),
])
def test_builtin_names(spec: str, kind: str) -> None:
    assert resolve(spec).kind == kind


def test_model_directory_loads_weights_tokenizer_and_config(tmp_path: Path) -> None:
    original = save_model_dir(tmp_path / "my-model")
    source = resolve(str(tmp_path / "my-model"))
    assert source.kind == "directory" and source.real_weights
    model, tokenizer = load_model(str(tmp_path / "my-model"))
    assert tokenizer is not None and tokenizer.decode(tokenizer.encode("hi!")) == "hi!"
    ids = torch.tensor([tokenizer.encode("hello")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert KVShape.from_config(load_config(str(tmp_path / "my-model"))) == KVShape.from_config(original.config)


def test_home_relative_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    save_model_dir(tmp_path / "m")
    assert resolve("~/m").path == tmp_path / "m"


def test_directory_without_tokenizer_loads_without_one(tmp_path: Path) -> None:
    save_model_dir(tmp_path / "m", tokenizer=False)
    model, tokenizer = load_model(str(tmp_path / "m"))
    assert tokenizer is None and model.config.model_type == "llama"


def test_default_dtype_is_float32_on_cpu(tmp_path: Path) -> None:
    save_model_dir(tmp_path / "m")
    assert load_model(str(tmp_path / "m"))[0].dtype == torch.float32
    assert load_model(str(tmp_path / "m"), dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_directory_without_config_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json: give a Hugging Face model directory"):
        resolve(str(tmp_path / "empty"))


def test_directory_without_weights_is_one_line_but_calc_works(tmp_path: Path) -> None:
    save_model_dir(tmp_path / "m")
    for weights in (tmp_path / "m").glob("*.safetensors"):
        weights.unlink()
    assert load_config(str(tmp_path / "m")).num_hidden_layers == 2
    with pytest.raises(ValueError, match="no weights"):
        load_model(str(tmp_path / "m"))


def test_config_file_is_for_calc_only(tmp_path: Path) -> None:
    save_model_dir(tmp_path / "m")
    config = str(tmp_path / "m" / "config.json")
    assert resolve(config).kind == "config" and load_config(config).model_type == "llama"
    with pytest.raises(ValueError, match="config without weights"):
        load_model(config)


def test_architecture_transformers_cannot_run_as_a_decoder(tmp_path: Path) -> None:
    directory = tmp_path / "t5"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8, "num_layers": 1,
                                                       "num_heads": 2, "d_kv": 4, "d_ff": 16, "vocab_size": 32}))
    (directory / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot load model_type 't5' as a causal language model"):
        load_model(str(directory))


def test_missing_and_corrupt_gguf_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        resolve(str(tmp_path / "absent.gguf"))
    for name, content in (("junk.gguf", b"not a gguf at all"), ("cut.gguf", b"GGUF\x03\x00\x00\x00" + bytes(40))):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not a readable GGUF model .*: give an intact .gguf file"):
            load_model(str(tmp_path / name))
        with pytest.raises(ValueError, match="not a readable GGUF"):
            load_config(str(tmp_path / name))
    assert not (tmp_path / "kvslim").exists() or not any((tmp_path / "kvslim").rglob("*"))


def test_hub_id_in_the_local_cache(tmp_path: Path) -> None:
    original = save_hub_snapshot(tmp_path / "hub", "someone/tiny-chat")
    source = resolve("someone/tiny-chat")
    assert source.kind == "hub" and source.path.name == "0123456789abcdef"
    model, tokenizer = load_model("someone/tiny-chat")
    ids = torch.tensor([tokenizer.encode("abc")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_hub_id_not_cached_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        resolve("Qwen/Qwen2.5-7B-Instruct")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "hub") in message and "HF_HOME" in message
    assert "hf download Qwen/Qwen2.5-7B-Instruct" in message


def test_unknown_name_lists_every_kind() -> None:
    with pytest.raises(ValueError) as err:
        resolve("gpt-5")
    message = str(err.value)
    for part in ("smollm2-135m", "qwen2.5-coder-0.5b", "tiny-llama", "model directory", ".gguf", "kvslim models"):
        assert part in message
