"""RULER: task generators (seeded, sized in tokens, answers in the context, RULER's wording), RULER's
scores, both protocols on a tiny model, and ``--suite ruler`` end to end with a tokenizer built in code."""
from __future__ import annotations

import argparse
import json
import multiprocessing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kvslim.bench.cli import add_arguments, main_from_args
from kvslim.bench.config import Run
from kvslim.bench.memory import PeakMemory
from kvslim.bench.ruler import PROTOCOLS, QUERY_AGNOSTIC, QUERY_AWARE, get_ruler_task, ruler_tasks
from kvslim.bench.ruler.config import RulerConfig
from kvslim.bench.ruler.execute import generate_batch
from kvslim.bench.ruler.fit import largest_fitting
from kvslim.bench.ruler.prompt import Framing, Parts
from kvslim.bench.ruler.runner import run_ruler
from kvslim.bench.ruler.scoring import postprocess, string_match_all, string_match_part
from kvslim.bench.store import key_of
from kvslim.models import load_model
from bench.test_harness import char_tokenizer

TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
         "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
LENGTH = 3000  # characters of the char tokenizer: every task (cwe with its example) fits
SLACK = {"niah_single_1": 100, "niah_multikey_2": 100, "niah_multikey_3": 200, "vt": 100}
"""Most tokens a sample may fall short of its budget: one haystack unit (a filler line, a distractor
needle); word-sized units land within a long word (40 characters here, a few tokens for a real tokenizer)."""

TOK = char_tokenizer()
PLAIN = Framing(TOK, chat=False)


@pytest.fixture(scope="module")
def samples() -> dict[str, list[Any]]:
    return {name: get_ruler_task(name).generate(3, LENGTH, PLAIN, seed=0) for name in TASKS}


def test_the_eleven_tasks_under_rulers_names() -> None:
    assert ruler_tasks() == TASKS


@pytest.mark.parametrize("name", TASKS)
def test_samples_are_seeded_sized_and_hold_their_answers(name: str, samples: dict[str, list[Any]]) -> None:
    task, got = get_ruler_task(name), samples[name]
    again = task.generate(3, LENGTH, PLAIN, seed=0)
    assert [s.prompt_ids for s in again] == [s.prompt_ids for s in got]
    assert [s.answers for s in again] == [s.answers for s in got]
    other = task.generate(3, LENGTH, PLAIN, seed=1)
    assert [s.prompt_ids for s in other] != [s.prompt_ids for s in got]
    budget = LENGTH - task.tokens_to_generate
    for s in got:
        assert budget - SLACK.get(name, 40) <= len(s.prompt_ids) == s.meta["tokens"] <= budget
        context = TOK.decode(s.context_ids, skip_special_tokens=True)
        assert s.answers and all(a in context for a in s.answers)
        assert len(set(s.answers)) == len(s.answers)


def test_rulers_wording(samples: dict[str, list[Any]]) -> None:
    def text(name: str) -> str:
        return TOK.decode(samples[name][0].prompt_ids, skip_special_tokens=True)

    single = text("niah_single_2")
    assert single.startswith("A special magic number is hidden within the following text.")
    assert "One of the special magic numbers for " in single  # the needle keeps RULER's plural
    assert single.endswith(" mentioned in the provided text is")
    query = samples["niah_multiquery"][0].meta["query"]
    assert query.count(", ") == 3 and ", and " in query
    assert text("niah_multiquery").endswith(f"The special magic numbers for {query} mentioned in the provided text are")
    uuid_question = TOK.decode(samples["niah_single_3"][0].question_ids)
    assert uuid_question.startswith("What is the special magic uuid for")
    assert "One of the special magic uuids for " in text("niah_single_3")
    vt = text("vt")
    assert vt.count("Memorize and track the chain(s)") == 2  # RULER's one-shot example, then the task
    assert vt.endswith(f"5 variables are assgined the value {samples['vt'][0].meta['value']}, they are: ")
    assert text("cwe").endswith("Answer: The top 10 words that appear most often in the list are:")
    fwe = text("fwe")
    assert "... " in fwe and fwe.endswith("the three most frequently appeared words are:")


def test_question_is_what_follows_the_context(samples: dict[str, list[Any]]) -> None:
    """The query-agnostic split: the context ends before the question, the question carries the answer prefix."""
    s = samples["niah_multikey_1"][0]
    question = TOK.decode(s.question_ids)
    assert question.startswith("What is the special magic number for") and question.endswith("text is")
    assert s.meta["question_tokens"] == len(s.question_ids)


def test_chat_framing_puts_the_answer_prefix_after_the_generation_prompt() -> None:
    class Chat:
        chat_template = "set"

        def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool,
                                tokenize: bool) -> str:
            turns = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
            return turns + ("<assistant>" if add_generation_prompt else "")

        def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
            return list(text)

    context, question = Framing(Chat(), chat=True).texts(Parts("CTX\n", "Q?", " Answer:", (("EX", "A1"),)))
    assert context == "<user>EX</user><assistant>Answer: A1</assistant><user>CTX\n"
    assert question == "Q?</user><assistant> Answer:"
    with pytest.raises(ValueError, match="no chat template"):
        Framing(TOK, chat=True)


def test_largest_fitting_finds_the_last_size_that_fits() -> None:
    cost = [0, 5, 9, 9, 14, 20, 21, 30]
    for budget in range(5, 31):
        for guess in (1, 3, 7, 50):
            n = largest_fitting(lambda k: cost[k] if k < len(cost) else 99, budget, guess, high=len(cost) - 1)
            assert cost[n] <= budget and (n == len(cost) - 1 or cost[n + 1] > budget)
    with pytest.raises(ValueError, match="smallest haystack"):
        largest_fitting(lambda k: 10 * k, 5, 3)


def test_rulers_scores() -> None:
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789", "000"]) == 0.5
    assert string_match_all("HNKCG, FTJCS", ["hnkcg", "ftjcs"]) == 1.0
    assert string_match_part("it is 456", ["123", "456"]) == 1.0
    assert string_match_part("none", ["123", "456"]) == 0.0
    assert postprocess(" 12\x0034\t5 ") == "12\n34\n5"


def _tiny(config: Any = None) -> tuple[Any, Any]:
    model, _ = load_model("tiny-llama")
    return model, char_tokenizer()


def test_both_protocols_on_a_tiny_model(samples: dict[str, list[Any]]) -> None:
    """Full answers the same either way; a compressing method records its protocol, and under query-agnostic
    it holds the whole question on top of the kept context."""
    model, tok = _tiny()
    task, batch = get_ruler_task("niah_single_2"), samples["niah_single_2"][:2]
    memory = PeakMemory(next(model.parameters()).device)
    full = {p: generate_batch(model, tok, task, batch, Run("full", None), p, memory) for p in PROTOCOLS}
    assert [r["output"] for r in full[QUERY_AWARE]] == [r["output"] for r in full[QUERY_AGNOSTIC]]
    snap = {p: generate_batch(model, tok, task, batch, Run("snapkv", 0.25), p, memory) for p in PROTOCOLS}
    for protocol, records in snap.items():
        assert all(r["protocol"] == protocol and 0.0 <= r["score"] <= 1.0 for r in records)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x KV heads x (K, V) x head dim x float32
    for s, aware, agnostic in zip(batch, snap[QUERY_AWARE], snap[QUERY_AGNOSTIC]):
        assert aware["kv_bytes_prefill"] == -(-len(s.prompt_ids) // 4) * per_token
        assert agnostic["kv_bytes_prefill"] == (-(-len(s.context_ids) // 4) + len(s.question_ids)) * per_token


SUITE_LENGTH = 2048  # short, for a quick CI run of the whole command path


def _config(out: Path) -> RulerConfig:
    return RulerConfig(model="tiny-llama", policies=["full", "snapkv"], keeps=[0.5, 0.25],
                       tasks=["niah_single_1", "vt"], lengths=[SUITE_LENGTH], samples=2, out=str(out), batch_size=2)


def test_suite_writes_leaderboard_plot_and_report(tmp_path: Path) -> None:
    summary = run_ruler(_config(tmp_path), progress=False, loader=_tiny)
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 3 * 2  # tasks x samples x runs (full, snapkv at two keeps) x protocols
    assert {r["protocol"] for r in records} == set(PROTOCOLS)
    board = (tmp_path / "leaderboard.md").read_text()
    for protocol in PROTOCOLS:
        assert f"## {protocol}, {SUITE_LENGTH} tokens" in board
    assert "| method | no budget | keep 0.5 | keep 0.25 |" in board
    full_rows = [r for r in summary["leaderboard"] if r["policy"] == "full"]
    assert len(full_rows) == 2 and all(r["ratio"] in (1.0, None) for r in full_rows)
    with Image.open(tmp_path / "score_vs_kv.png") as image:
        assert image.size[0] > 600
    report = (tmp_path / "report.md").read_text()
    for heading in ("### Leaderboard", "### Per task", "### Losses against full, by task", "### Output length",
                    "qa_1", "Paul Graham"):
        assert heading in report
    assert (tmp_path / "per_task.csv").read_text().startswith("protocol,length,policy,keep,task,n,score")
    again = run_ruler(_config(tmp_path), progress=False, loader=_tiny)  # everything is done: nothing reruns
    assert again["settings"]["ran_now"] == 0 and again["settings"]["done"] == len(records)


TIMING = ("ttft_s", "tpot_s", "gen_s", "tokens_per_s", "peak_mem_bytes")


def _measured(out: Path) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Every record of a run directory by key, without what timing and memory measure (they vary run to run)."""
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {key_of(r): {k: v for k, v in r.items() if k not in TIMING} for r in records}


def test_workers_write_what_one_process_writes_and_resume(tmp_path: Path) -> None:
    """Two worker processes (the three policy runs split between them): the same records as one process; a rerun
    redoes only what is missing, after appending what a killed run's worker left in its shard."""
    one = run_ruler(_config(tmp_path / "one"), progress=False, loader=_tiny)
    two = run_ruler(replace(_config(tmp_path / "two"), workers=2), progress=False, loader=_tiny)
    assert _measured(tmp_path / "two") == _measured(tmp_path / "one") and len(_measured(tmp_path / "one")) == 24
    assert two["leaderboard"] == one["leaderboard"] and two["settings"]["worker_errors"] == []
    assert not any((tmp_path / "two" / "shards").iterdir())
    log = tmp_path / "two" / "samples.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    # A killed run: a batch (two samples) lost, and one left in a worker's shard beside half a line.
    log.write_text("".join(lines[:-4]))
    (tmp_path / "two" / "shards" / "unit-7.jsonl").write_text("".join(lines[-2:]) + lines[-3][:20])
    again = run_ruler(replace(_config(tmp_path / "two"), workers=2), progress=False, loader=_tiny)
    assert again["settings"]["ran_now"] == 2 and again["settings"]["done"] == 24
    assert _measured(tmp_path / "two") == _measured(tmp_path / "one")
    assert "--workers 2" in (tmp_path / "two" / "report.md").read_text()


def _tiny_in_parent_only(config: Any = None) -> tuple[Any, Any]:
    if multiprocessing.parent_process() is not None:
        raise RuntimeError("no model in this worker\n(second line)")
    return _tiny(config)


def test_a_failing_worker_is_reported_in_one_line_and_outputs_are_still_written(tmp_path: Path) -> None:
    summary = run_ruler(replace(_config(tmp_path), workers=2), progress=False, loader=_tiny_in_parent_only)
    message = "RuntimeError: no model in this worker (second line)"  # one line, whatever the error's lines
    assert sorted(summary["settings"]["worker_errors"]) == [f"{label}: {message}" for label in
                                                            ("full", "snapkv@0.25", "snapkv@0.5")]
    assert summary["settings"]["done"] == 0 and (tmp_path / "report.md").exists()


def _engine_config(out: Path, **changes: Any) -> RulerConfig:
    """``kvslim bench --suite ruler --engine --kv-memory 0.05 --limit 1`` on tiny-llama, with a policy the engine
    refuses (a decode-time evictor before a quantizer) and one it refuses a suffix for (a storage format, under query-agnostic only)."""
    settings = {"model": "tiny-llama", "policies": ["full", "snapkv", "tova+int8", "snapkv+int8"], "keeps": [0.5],
                "tasks": ["niah_single_1", "vt"], "lengths": [SUITE_LENGTH], "samples": 1, "out": str(out),
                "batch_size": 2, "engine": True, "kv_memory": 0.05}
    return RulerConfig(**{**settings, **changes})


def test_engine_smoke_run_reports_throughput_and_runs_what_it_refuses_through_hf(tmp_path: Path) -> None:
    summary = run_ruler(_engine_config(tmp_path), progress=False, loader=_tiny)
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    by_engine = [r for r in records if r["backend"] == "engine"]
    ran = {(r["policy"], r["protocol"]) for r in by_engine}
    assert ran == {("full", p) for p in PROTOCOLS} | {("snapkv", p) for p in PROTOCOLS} | {("snapkv+int8", QUERY_AWARE)}
    refused = {("tova+int8", p) for p in PROTOCOLS} | {("snapkv+int8", QUERY_AGNOSTIC)}
    by_hf = [r for r in records if r["backend"] == "hf"]
    assert {(r["policy"], r["protocol"]) for r in by_hf} == refused  # the refused ones ran through the HF path
    assert len(by_engine) == 2 * len(ran) and len(by_hf) == 2 * len(refused) == len(records) - len(by_engine)
    for r in by_engine:
        assert r["engine_requests"] == 2 and r["engine_max_running"] >= 1 and r["engine_output_tokens"] >= 2
        assert 0.0 <= r["score"] <= 1.0 and r["ttft_s"] > 0 and r["kv_memory_gib"] == 0.05
    rows = {(r["label"], r["protocol"]): r for r in summary["engine"]}
    assert set(rows) == {(f"{p}@0.5" if p != "full" else p, q) for p, q in ran}
    assert all(r["paired"] == 0 and r["same_answer"] is None and r["output_tok_s"] > 0 for r in rows.values())
    board = {(r["label"], r["protocol"]): r["backend"] for r in summary["leaderboard"]}
    assert board == {**{(f"{p}@0.5" if p != "full" else p, q): "engine" for p, q in ran},
                     **{(f"{p}@0.5", q): "hf" for p, q in refused}}
    skipped = {(s["label"], s["protocol"]) for s in summary["engine_skipped"]}
    assert skipped == {(f"{p}@0.5", q) for p, q in refused}
    report = (tmp_path / "report.md").read_text()
    assert "### Engine: quality and throughput" in report and "| run | n | score | HF path's score |" in report
    assert ("- `tova+int8@0.5` (query-aware, query-agnostic): ran through the Hugging Face path (backend hf), the engine "
            "refuses it: ") in report
    assert "- `snapkv+int8@0.5` (query-agnostic): ran through the Hugging Face path" in report
    assert "model-dtype pages only" in report and "[hf] |" in (tmp_path / "leaderboard.md").read_text()
    assert (tmp_path / "engine.csv").read_text().startswith("protocol,length,policy,keep,label,n,score")
    assert ",backend," in (tmp_path / "leaderboard.csv").read_text().splitlines()[0]
    again = run_ruler(_engine_config(tmp_path), progress=False, loader=_tiny)  # resumes: nothing reruns
    assert again["settings"]["ran_now"] == 0 and again["settings"]["done"] == len(records)


def test_report_only_rebuilds_from_the_log_and_runs_nothing(tmp_path: Path) -> None:
    """A run cut short, then its report rebuilt for a wider grid: the finished cells, refused ones' HF records
    included, and nothing run; cells never run are absent."""
    first = run_ruler(_engine_config(tmp_path), progress=False, loader=_tiny)
    records = (tmp_path / "samples.jsonl").read_text()
    (tmp_path / "leaderboard.md").unlink()
    wider = _engine_config(tmp_path, keeps=[0.5, 0.25], report_only=True)
    summary = run_ruler(wider, progress=False, loader=_tiny)
    assert (tmp_path / "samples.jsonl").read_text() == records
    assert summary["settings"]["ran_now"] == 0 and summary["settings"]["done"] == first["settings"]["done"]
    assert summary["settings"]["planned"] > first["settings"]["planned"]  # the 0.25 cells, never run
    cells = {(r["label"], r["protocol"], r["backend"], r["score"]) for r in summary["leaderboard"]}
    assert cells == {(r["label"], r["protocol"], r["backend"], r["score"]) for r in first["leaderboard"]}
    assert (tmp_path / "leaderboard.md").exists() and "0.25" in (tmp_path / "leaderboard.md").read_text()


def test_engine_workers_answer_as_one_process_and_fall_back_alike(tmp_path: Path) -> None:
    """Through the engine, two workers give one process's answers, the refused runs through the HF path too."""
    def answers(out: Path) -> dict[tuple[Any, ...], tuple[Any, ...]]:
        return {key: (r["output"], r["score"], r["backend"], r["kv_bytes_prefill"]) for key, r in _measured(out).items()}

    one = run_ruler(_engine_config(tmp_path / "one", policies=["full", "tova+int8", "snapkv+int8"]), progress=False,
                    loader=_tiny)
    two = run_ruler(_engine_config(tmp_path / "two", policies=["full", "tova+int8", "snapkv+int8"], workers=2),
                    progress=False, loader=_tiny)
    assert answers(tmp_path / "two") == answers(tmp_path / "one") and len(answers(tmp_path / "one")) == 12
    assert sorted(map(str, two["engine_skipped"])) == sorted(map(str, one["engine_skipped"]))
    assert [(r["label"], r["backend"], r["score"]) for r in two["leaderboard"]] == \
        [(r["label"], r["backend"], r["score"]) for r in one["leaderboard"]]


def test_engine_answers_as_the_hf_path_in_the_same_directory(tmp_path: Path) -> None:
    """Float32 on the CPU: the engine's answers are the Hugging Face path's, sample for sample, under both
    protocols (query-agnostic through the engine's suffix), and the report pairs them."""
    policies = {"policies": ["full", "snapkv"]}
    hf = run_ruler(_engine_config(tmp_path, engine=False, kv_memory=None, **policies), progress=False, loader=_tiny)
    summary = run_ruler(_engine_config(tmp_path, **policies), progress=False, loader=_tiny)
    assert summary["settings"]["ran_now"] == 2 * 2 * 2  # samples (a task each) x runs x protocols, beside the HF path's
    for row in summary["engine"]:
        assert row["paired"] == 2 and row["same_answer"] == 1.0
        assert row["score"] == row["hf_score"] == next(
            r["score"] for r in hf["leaderboard"] if (r["label"], r["protocol"]) == (row["label"], row["protocol"]))
    assert "100% of 2" in (tmp_path / "report.md").read_text()


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--suite", "ruler", "--model", "tiny-llama", *argv])


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "niah_single_9"], "unknown RULER task 'niah_single_9'; valid tasks: niah_single_1"),
    (["--protocols", "aware"], "unknown protocol(s) ['aware']"),
    (["--limit", "1"], "random weights"),
    (["--lengths", "100"], "give at least"),
    (["--engine"], "--engine runs every policy in a fixed KV pool; give its size in GiB, e.g. --kv-memory 2"),
    (["--kv-memory", "2"], "add --engine"),
    (["--workers", "0"], "workers=0: give a positive whole number of worker processes, e.g. --workers 4"),
    (["--workers", "two"], "--workers 'two': give a positive whole number of worker processes"),
])
def test_cli_names_the_fix_in_one_line(argv: list[str], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main_from_args(_args(*argv, "--out", str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_run_that_sets_its_own_budget_is_placed_against_fixed_keeps_by_bytes() -> None:
    """auto(tolerance=...) has no keep column: the report sets it beside the best fixed keep at no more bytes."""
    from kvslim.bench.ruler.leaderboard import board, placed
    from kvslim.bench.ruler.report import placed_table

    def records(policy: str, keep: float | None, kv_bytes: int, scores: list[float]) -> list[dict[str, Any]]:
        return [{"protocol": QUERY_AWARE, "length": 4096, "policy": policy, "keep": keep, "task": "vt",
                 "sample_id": f"vt-{i}", "score": score, "output_tokens": 8, "kv_bytes_prefill": kv_bytes,
                 "compression": None} for i, score in enumerate(scores)]

    runs = [Run("full", None), Run("snapkv", 0.5), Run("snapkv", 0.25), Run("adakv", 0.25),
            Run("auto(tolerance=0.1)", None)]
    rows = board(records("full", None, 1000, [1, 1]) + records("snapkv", 0.5, 500, [1, 1])
                 + records("snapkv", 0.25, 250, [0, 1]) + records("adakv", 0.25, 250, [1, 0.5])
                 + [r | {"kv_bytes_prefill": b} for r, b in zip(records("auto(tolerance=0.1)", None, 0, [1, 1]),
                                                                 (300, 340))], runs)
    (row,) = placed(rows)
    assert row["label"] == "auto(tolerance=0.1)" and row["byte_share"] == pytest.approx(0.32)
    assert row["fixed"] == "adakv@0.25" and row["fixed_score"] == 75.0  # snapkv@0.5 holds more bytes
    table = placed_table(rows, QUERY_AWARE, 4096)
    assert "| auto(tolerance=0.1) | 0.320 | 100.0 | adakv@0.25 | 0.250 | 75.0 |" in table
