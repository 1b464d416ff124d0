"""Every command and API on a model the user already has: a plain Hugging Face directory (issue 11's acceptance)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import kvslim
from kvslim.cli import main
from kvslim.models import hub
from kvslim.shape import KVShape
from model_dirs import save_hub_snapshot, save_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("user") / "my-chat-model"
    save_model_dir(directory)
    return directory


def test_run(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--model", str(model_dir), "--policy", "snapkv", "--keep", "0.5", "--prompt", "x" * 80,
            "--max-new-tokens", "4", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["new_tokens"] >= 1 and result["kv_bytes_end"] < result["full_bytes_end"]
    assert result["prompt_tokens"] == len("<user>" + "x" * 80 + "\n<assistant>")  # the chat template, by default
    assert main(argv + ["--raw"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == 80


def test_calc_reads_only_the_config(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((model_dir / "config.json").read_text())
    assert main(["calc", "--model", str(config_only), "--context", "32768", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["full_bytes"] == 32768 * KVShape(2, 4, 2, 16, torch.float32).bytes_per_token  # the tiny model, float32


def test_bench_writes_a_full_run(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["bench", "--model", str(model_dir), "--policies", "full,snapkv", "--keep", "0.5", "--tasks", "passkey",
            "--lengths", "256", "--samples", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["policy"] for r in records} == {"full", "snapkv"}
    assert (out / "report.md").is_file() and (out / "summary.json").is_file()


def test_serve_answers_chat_completions(model_dir: Path) -> None:
    from kvslim.server.cli import add_arguments, build_app

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    app = build_app(parser.parse_args(["--model", str(model_dir), "--kv-memory", "0.01", "--device", "cpu"]))
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 3


def test_llm_and_generate(model_dir: Path) -> None:
    llm = kvslim.LLM(str(model_dir), policy="kivi4", kv_memory=0.01)
    out = llm.generate(["hello there"], kvslim.SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.completions[0].token_ids) == 4
    model, tokenizer = kvslim.load_model(str(model_dir))
    [g] = kvslim.generate(model, tokenizer, ["hello there"], policy="h2o", keep=0.5, max_new_tokens=3)
    assert g.new_tokens >= 1


def test_hub_id_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    save_hub_snapshot(tmp_path / "hub", "someone/tiny-chat")
    assert main(["run", "--model", "someone/tiny-chat", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["someone/tiny-chat"]["source"] == "hf-cache"
    assert listed["someone/tiny-chat"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # bf16


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--model", "/no/such/dir/model.gguf"], "does not exist"),
    (["run", "--model", "Org/not-cached-anywhere"], "is not in the local Hugging Face cache"),
    (["calc", "--model", "Org/not-cached-anywhere", "--context", "8"], "hf download Org/not-cached-anywhere"),
    (["bench", "--model", "Org/not-cached-anywhere"], "is not in the local Hugging Face cache"),
    (["serve", "--model", "Org/not-cached-anywhere"], "is not in the local Hugging Face cache"),
])
def test_missing_models_are_one_line_exit_2(argv: list[str], message: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
