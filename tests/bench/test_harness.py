"""The benchmark harness end to end on a tiny random model with a character-level tokenizer built in code
(no downloads): every output file and field, valid PNGs, resuming, Ctrl-C, and early name checks."""
from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvslim.bench import detail, harness
from kvslim.bench.cli import add_arguments, config_from_args, main_from_args
from kvslim.bench.config import BenchConfig, Run, parse_lengths, parse_list
from kvslim.bench.execute import encode
from kvslim.bench.metrics import COLUMNS
from kvslim.bench.tasks import get_task
from kvslim.models import load_model

SAMPLE_FIELDS = {
    "task", "sample_id", "length", "policy", "keep", "policy_spec", "prompt_tokens", "depth", "answer", "output",
    "score", "correct", "output_tokens", "perplexity", "scored_tokens", "kv_bytes_prefill", "kv_bytes_end",
    "kv_device_bytes_end", "kv_host_bytes_end", "full_bytes", "compression", "ttft_s", "tpot_s", "tokens_per_s", "peak_mem_bytes", "peak_mem_kind", "load_avg",
    "peak_tokens_per_head",
}
FIGURES = ["accuracy_vs_kv.png", "heatmap_passkey.png", "output_length.png"]
RUNS = 3  # full, snapkv@0.5, streaming@0.5
TASKS = 2
SAMPLES = 2


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character: fits tiny-llama's 256-token vocabulary."""
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def loader(forwards: list[int], interrupt_after: int | None = None) -> Callable[[BenchConfig], tuple[Any, Any]]:
    """Load tiny-llama with the char tokenizer; count forward calls, optionally Ctrl-C after some."""
    def load(config: BenchConfig) -> tuple[Any, Any]:
        model, _ = load_model(config.model, dtype=config.torch_dtype, device=config.device)

        def count(module: Any, args: Any) -> None:
            forwards.append(1)
            if interrupt_after is not None and len(forwards) > interrupt_after:
                raise KeyboardInterrupt

        model.register_forward_pre_hook(count)
        return model, char_tokenizer()
    return load


def config(out: Path) -> BenchConfig:
    return BenchConfig(model="tiny-llama", policies=["full", "snapkv", "streaming"], keeps=[0.5],
                       tasks=["passkey", "perplexity"], lengths=[320], samples=SAMPLES, out=str(out), batch_size=2,
                       ppl_tokens=8)


def lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    return out, harness.run_benchmark(config(out), progress=False, loader=loader([]))


def test_every_output_file_and_field(finished: tuple[Path, dict[str, Any]]) -> None:
    out, summary = finished
    records = lines(out)
    assert len(records) == TASKS * SAMPLES * RUNS
    assert all(SAMPLE_FIELDS <= set(r) for r in records)
    ppl = [r for r in records if r["task"] == "perplexity"]
    assert all(r["perplexity"] > 1 and r["scored_tokens"] == 8 and r["score"] is None for r in ppl)
    passkey = [r for r in records if r["task"] == "passkey"]
    assert all(0 <= r["score"] <= 1 and r["output_tokens"] >= 1 and r["depth"] is not None for r in passkey)
    assert all(r["kv_bytes_end"] < r["full_bytes"] for r in records if r["policy"] != "full")
    assert {(r["policy"], r["keep"]) for r in records} == {("full", None), ("snapkv", 0.5), ("streaming", 0.5)}

    assert summary == json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == TASKS * RUNS and all(list(r) == COLUMNS for r in summary["rows"])
    assert summary["settings"]["prompt_format"] == "plain" and summary["settings"]["done"] == len(records)
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == TASKS * RUNS and set(rows[0]) == set(COLUMNS) - {"length"}

    report = (out / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in report
    assert "Per-sample analysis" in report and "Perplexity protocol" in report
    # The random model answers wrongly, so the per-sample table lists samples with every recorded field.
    assert "| " + " | ".join(detail.HEADERS) + " |" in report
    assert report.count("| full | passkey | 320 |") == SAMPLES
    assert "Reproduce or resume with `kvslim bench --model tiny-llama --policies 'full,snapkv,streaming'" in report


def test_figures_are_valid_pngs(finished: tuple[Path, dict[str, Any]]) -> None:
    out, summary = finished
    assert summary["figures"] == FIGURES
    for name in FIGURES:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 200


def test_rerun_resumes_without_model_work(finished: tuple[Path, dict[str, Any]]) -> None:
    out, _ = finished
    before = (out / "samples.jsonl").read_text()
    forwards: list[int] = []
    summary = harness.run_benchmark(config(out), progress=False, loader=loader(forwards))
    assert forwards == [] and summary["settings"]["ran_now"] == 0
    assert summary["settings"]["measured_s"] == finished[1]["settings"]["measured_s"] > 0
    assert (out / "samples.jsonl").read_text() == before


def test_interrupt_leaves_valid_files_and_resume_finishes(tmp_path: Path) -> None:
    small = BenchConfig(model="tiny-llama", policies=["full", "streaming"], keeps=[0.5], tasks=["passkey"],
                        lengths=[320], samples=SAMPLES, out=str(tmp_path))
    total = 2 * SAMPLES
    per_sample = get_task("passkey").max_new_tokens  # forwards: a prefill, then one per further token
    with pytest.raises(KeyboardInterrupt):
        harness.run_benchmark(small, progress=False, loader=loader([], interrupt_after=per_sample * 2 + 1))
    done = lines(tmp_path)
    assert 0 < len(done) < total
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["done"] == len(done)
    with (tmp_path / "samples.jsonl").open("a") as f:
        f.write('{"task": "passkey", "sam')  # a kill in the middle of a write
    summary = harness.run_benchmark(small, progress=False, loader=loader([]))
    assert summary["settings"]["ran_now"] == total - len(done)
    assert len(lines(tmp_path)) == total
    assert lines(tmp_path)[: len(done)] == done


def test_lines_from_other_method_parameters_are_redone(tmp_path: Path) -> None:
    small = BenchConfig(model="tiny-llama", policies=["full", "streaming"], keeps=[0.5], tasks=["passkey"],
                        lengths=[320], samples=SAMPLES, out=str(tmp_path))
    harness.run_benchmark(small, progress=False, loader=loader([]))
    records = lines(tmp_path)
    records[-1]["policy_spec"] = "streaming(keep=0.5,sinks=99)"  # as if the method's defaults had changed since
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = harness.run_benchmark(small, progress=False, loader=loader([]))
    assert summary["settings"]["ran_now"] == 1 and summary["settings"]["done"] == len(records)


def test_resume_refuses_other_settings(finished: tuple[Path, dict[str, Any]]) -> None:
    out, _ = finished
    changed = config(out)
    changed.seed = 1
    with pytest.raises(ValueError, match="seed"):
        harness.run_benchmark(changed, progress=False, loader=loader([]))


def test_budget_free_policies_run_once() -> None:
    runs = BenchConfig(policies=["full", "snapkv", "snapkv(budget=64)"], keeps=[0.5, 0.25]).runs()
    assert runs == [Run("full", None), Run("snapkv", 0.5), Run("snapkv", 0.25), Run("snapkv(budget=64)", None)]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--policies", "full,nope", "valid methods: "),
    ("--tasks", "passkey,nope", "valid tasks: "),
    ("--model", "nope", "unknown model 'nope': give a built-in name"),
    ("--keep", "2", "must each be in (0, 1]"),
    ("--kv-cache-dtype", "fp8_e3m4", "--kv-cache-dtype 'fp8_e3m4' is not one of auto, fp8, fp8_e4m3, fp8_e5m2"),
    ("--kv-scale", "per-head", "--kv-scale sets the scales of fp8 KV"),
])
def test_bad_names_fail_before_any_model_loads(option: str, value: str, message: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(harness, "load_model", no_load)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = main_from_args(parser.parse_args([option, value, "--out", str(tmp_path / "run")]))
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_kv_cache_dtype_appends_the_fp8_format_to_every_policy() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--policies", "full,snapkv", "--kv-cache-dtype", "fp8", "--kv-scale", "per-head"])
    assert config_from_args(args).policies == ["fp8_e4m3(scale=per-head)", "snapkv+fp8_e4m3(scale=per-head)"]


def test_parse_lengths_and_lists() -> None:
    assert parse_lengths("1k,2k,4k") == [1024, 2048, 4096]
    assert parse_lengths("1500, 1.5k") == [1500, 1536]
    with pytest.raises(ValueError, match="1k"):
        parse_lengths("2x")
    assert parse_list("full,snapkv(keep=0.1,window=8),kivi2") == ["full", "snapkv(keep=0.1,window=8)", "kivi2"]


def test_chat_prompt_starts_the_answer_in_the_assistant_turn() -> None:
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    sample = get_task("passkey").generate(1, 320, tok, seed=0)[0]
    text = tok.decode(encode(tok, sample, chat=True))
    assert text.startswith("<s>user: " + sample.meta["instruction"])
    assert text.endswith(sample.meta["question"] + "</s><s>assistant: " + sample.meta["answer_prefix"])
    assert tok.decode(encode(tok, sample, chat=False)) == sample.prompt


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_benchmark_on_cuda_in_bfloat16(tmp_path: Path) -> None:
    cuda = BenchConfig(**{**config(tmp_path).__dict__, "device": "cuda", "dtype": "bfloat16"})
    summary = harness.run_benchmark(cuda, progress=False, loader=loader([]))
    records = lines(tmp_path)
    assert len(records) == RUNS * TASKS * SAMPLES and all(SAMPLE_FIELDS <= set(r) for r in records)
    assert {r["peak_mem_kind"] for r in records} == {"cuda_max_allocated"} and all(r["peak_mem_bytes"] > 0 for r in records)
    assert all(r["kv_bytes_end"] < r["full_bytes"] for r in records if r["policy"] != "full")
    assert summary["rows"]
