"""RULER's report: the leaderboard (methods x keeps), per-task scores, losses against full by task and
output-length change, per protocol and length, and for engine runs what each method costs in quality and buys
in throughput at a fixed KV memory, as markdown and CSV."""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from ..config import Run
from ..report import markdown_table
from .leaderboard import FULL, placed, settings as panels
from .protocols import DESCRIPTIONS
from .tasks import QA_NOTE

_IDS = 6
BOARD_CSV = ["protocol", "length", "policy", "keep", "label", "backend", "score", "ratio", "tasks", "n", "kv_bytes",
             "byte_share", "compression"]


def _cell(row: dict[str, Any] | None, marked: str | None) -> str:
    if row is None:
        return "-"
    ratio = "" if row["ratio"] is None else f" ({row['ratio']:.2f})"
    backend = f" [{row['backend']}]" if row["backend"] == marked else ""
    return f"{row['score']:.1f}{ratio}{backend}"


def leaderboard_table(rows: Sequence[dict[str, Any]], protocol: str, length: int, keeps: Sequence[float]) -> str:
    """Rows: methods; columns: keep (and "no budget" for methods that run once, full among them); cells:
    RULER average and, in parentheses, its ratio to full; when the panel's rows come from more than one backend
    (an engine run whose refused policies ran through the Hugging Face path), the rarer one is named in brackets."""
    mine = [r for r in rows if (r["protocol"], r["length"]) == (protocol, length)]
    cell = {(r["policy"], r["keep"]): r for r in mine}
    once = any(r["keep"] is None for r in mine)
    backends = [r["backend"] for r in mine]
    marked = min(set(backends), key=backends.count) if len(set(backends)) > 1 else None
    body = []
    for policy in dict.fromkeys(r["policy"] for r in mine):
        line = [policy] + ([_cell(cell.get((policy, None)), marked)] if once else [])
        body.append(line + [_cell(cell.get((policy, k)), marked) for k in keeps])
    headers = ["method"] + (["no budget"] if once else []) + [f"keep {k:g}" for k in keeps]
    return markdown_table(headers, body)


def task_table(rows: Sequence[dict[str, Any]], runs: Sequence[Run], tasks: Sequence[str], protocol: str,
               length: int) -> str:
    cell = {(r["policy"], r["keep"], r["task"]): r for r in rows if (r["protocol"], r["length"]) == (protocol, length)}
    present = [t for t in tasks if any(k[2] == t for k in cell)]
    body = [[run.label] + [f"{cell[(run.policy, run.keep, t)]['score']:.1f}" if (run.policy, run.keep, t) in cell
                           else "-" for t in present] for run in runs
            if any((run.policy, run.keep, t) in cell for t in present)]
    return markdown_table(["run"] + present, body)


def _share(share: float | None) -> str:
    return "-" if share is None else f"{share:.3f}"


def placed_table(rows: Sequence[dict[str, Any]], protocol: str, length: int) -> str | None:
    """Runs that set their own budget (``auto(tolerance=...)``) against the best fixed keep at no more bytes;
    None when there is no such run."""
    mine = [r for r in placed(rows) if (r["protocol"], r["length"]) == (protocol, length)]
    if not mine:
        return None
    body = [[r["label"], _share(r["byte_share"]), f"{r['score']:.1f}", r["fixed"] or "none at these bytes",
             _share(r["fixed_byte_share"]), "-" if r["fixed_score"] is None else f"{r['fixed_score']:.1f}"]
            for r in mine]
    return markdown_table(["run", "KV bytes / full's", "score", "best fixed keep at no more bytes", "its bytes / full's",
                           "its score"], body)


def _placed_section(rows: Sequence[dict[str, Any]], protocol: str, length: int) -> list[str]:
    table = placed_table(rows, protocol, length)
    return [] if table is None else [
        "### Budgets set per request, against fixed budgets at equal mean bytes",
        "Runs without a keep choose their bytes per prompt; each is set beside the best run with a fixed keep "
        "that holds no more mean KV bytes after the prompt.", table]


def _ids(ids: Sequence[str]) -> str:
    more = f" (+{len(ids) - _IDS})" if len(ids) > _IDS else ""
    return f"{len(ids)}: {', '.join(ids[:_IDS])}{more}" if ids else "0"


def loss_table(rows: Sequence[dict[str, Any]], protocol: str, length: int) -> str:
    mine = [r for r in rows if (r["protocol"], r["length"]) == (protocol, length) and (r["lost"] or r["gained"])]
    if not mine:
        return "No sample changes its verdict against full."
    return markdown_table(["run", "task", "paired", "lost (full right, method wrong)", "gained"],
                          [[r["label"], r["task"], str(r["paired"]), _ids(r["lost"]), _ids(r["gained"])] for r in mine])


def length_table(rows: Sequence[dict[str, Any]], protocol: str, length: int) -> str:
    mine = [r for r in rows if (r["protocol"], r["length"]) == (protocol, length)]
    if not mine:
        return "No run to compare with full."
    return markdown_table(["run", "paired", "mean output tokens", "full's", "change"],
                          [[r["label"], str(r["paired"]), f"{r['output_tokens']:.1f}", f"{r['full_output_tokens']:.1f}",
                            "-" if r["change"] is None else f"{100 * r['change']:+.0f}%"] for r in mine])


ENGINE_CSV = ["protocol", "length", "policy", "keep", "label", "n", "score", "paired", "hf_score", "same_answer",
              "max_running", "output_tok_s", "ttft_p50_s", "ttft_p99_s", "preemptions", "prefix_cached"]


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def engine_table(rows: Sequence[dict[str, Any]], protocol: str, length: int) -> str:
    """One row per policy run: quality (and the Hugging Face path's on the same samples), then serving costs."""
    mine = [r for r in rows if (r["protocol"], r["length"]) == (protocol, length)]
    if not mine:
        return "The engine ran no policy here."
    body = [[r["label"], str(r["n"]), f"{r['score']:.1f}", _num(r["hf_score"], ".1f"),
             "-" if r["same_answer"] is None else f"{100 * r['same_answer']:.0f}% of {r['paired']}",
             str(r["max_running"]), _num(r["output_tok_s"], ".0f"), _num(r["ttft_p50_s"], ".2f"),
             _num(r["ttft_p99_s"], ".2f"), str(r["preemptions"]), f"{100 * r['prefix_cached']:.0f}%"] for r in mine]
    return markdown_table(["run", "n", "score", "HF path's score", "same answer as HF", "max running",
                           "output tok/s", "TTFT p50 (s)", "TTFT p99 (s)", "preemptions", "prefix-cached prompt"], body)


def skipped_notes(skipped: Sequence[dict[str, Any]]) -> str:
    """One line per policy run the engine refused, with the protocols it was refused under and why (those ran
    through the Hugging Face path instead)."""
    notes: dict[tuple[str, str], list[str]] = {}
    for s in skipped:
        protocols = notes.setdefault((s["label"], s["reason"]), [])
        if s["protocol"] not in protocols:
            protocols.append(s["protocol"])
    return "\n".join(f"- `{label}` ({', '.join(protocols)}): ran through the Hugging Face path (backend hf), the "
                     f"engine refuses it: {reason}"
                     for (label, reason), protocols in notes.items())


def rows_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def leaderboard_md(board: Sequence[dict[str, Any]], keeps: Sequence[float], model: str) -> str:
    parts = [f"# RULER leaderboard: {model}",
             "Cells: RULER average score over the tasks (0-100), in parentheses its ratio to full's on the same "
             "protocol and length."]
    for protocol, length in panels(board):
        parts += [f"## {protocol}, {length} tokens", leaderboard_table(board, protocol, length, keeps),
                  *_placed_section(board, protocol, length)]
    return "\n\n".join(parts) + "\n"


def write_report(settings: dict[str, Any], board: Sequence[dict[str, Any]], tasks_: Sequence[dict[str, Any]],
                 lost: Sequence[dict[str, Any]], lengths: Sequence[dict[str, Any]], runs: Sequence[Run],
                 figure: str | None, engine: Sequence[dict[str, Any]] = (),
                 skipped: Sequence[dict[str, Any]] = ()) -> str:
    """The markdown report: how it was run, then per protocol and length every table (the engine's, when it ran:
    ``engine`` rows of :func:`.leaderboard.engine_rows`, ``skipped`` the policy runs it refused)."""
    keeps, tasks = settings["keeps"], settings["tasks"]
    parts = [
        f"# RULER: {settings['model']}",
        f"Reproduce or resume with `{settings['command']}`.",
        markdown_table(["setting", "value"], [[k, ", ".join(map(str, v)) if isinstance(v, list) else str(v)]
                                             for k, v in settings.items() if k not in ("command", "specs")]),
        "Policy runs and the full parameters they ran with:",
        markdown_table(["run", "spec"], [[label, f"`{spec}`"] for label, spec in settings["specs"].items()]),
        "## How it was run",
        "\n".join([
            "- **Tasks**: RULER's (Hsieh et al., 2024, arXiv:2404.06654) non-QA tasks under its names, templates, "
            "answer prefixes and generation budgets; scores are RULER's `string_match_all` (fraction of expected "
            "strings in the output, so multi-answer tasks get partial credit), averaged over samples per task and "
            "over tasks for the leaderboard (0-100). " + QA_NOTE,
            f"- **Haystack**: {settings['essay_source']}; word keys from `wonderwords` adjective and noun lists.",
            f"- **Lengths**: RULER's `max_seq_length` in {settings['model']}'s own tokens: the input (chat template "
            "and answer prefix included) plus the task's answer budget fits the length; the haystack is the "
            "largest that fits.",
            f"- **Prompt format**: {settings['prompt_format']}.",
            *[f"- **{p}**: {DESCRIPTIONS[p]}." for p in settings["protocols"]],
            "- **Generation**: greedy, batched by task and length with left padding, until an end-of-turn token "
            "or the task's budget.",
            "- **KV bytes**: bytes the cache holds per sequence right after the prompt (for query-agnostic, the "
            "compressed context plus the uncompressed question).",
        ]),
    ]
    if figure:
        parts += ["## Score against KV memory", f"![RULER score against KV memory]({figure})"]
    if engine or skipped:
        memory = sorted({g for r in engine for g in r["kv_memory_gib"]})
        parts += ["## The paged engine: quality and throughput at a fixed KV memory",
                  f"Every prompt of a policy run, protocol and length submitted at once to a fresh `kvslim.engine` "
                  f"with a KV pool of {', '.join(f'{g:g}' for g in memory) or '-'} GiB, run with continuous batching "
                  "(query-agnostic: the question is the request's suffix, prefilled uncompressed after the compressed "
                  "context). *Same answer as HF*: share of the samples both paths ran with identical output text; "
                  "*output tok/s*: output tokens over the batch's wall time, prefill included; *TTFT*: from "
                  "submission, queueing included; *max running*: most sequences the pool held at once; *prefix-cached "
                  "prompt*: share of prompt tokens read from blocks an earlier request of the batch computed (only "
                  "full shares blocks). Engine rows' KV bytes are the peak bytes of a sequence's blocks."]
        if skipped:
            parts.append(skipped_notes(skipped))
    for protocol, length in panels(board):
        parts += [f"## {protocol}, {length} tokens", "### Leaderboard",
                  "Cells: RULER average, in parentheses the ratio to full.",
                  leaderboard_table(board, protocol, length, keeps), *_placed_section(board, protocol, length),
                  "### Per task (mean score, 0-100)", task_table(tasks_, runs, tasks, protocol, length),
                  "### Losses against full, by task",
                  "Samples full answers entirely (score 1) and the method does not (*lost*), and the reverse "
                  "(*gained*); outputs are in `samples.jsonl`.",
                  loss_table(lost, protocol, length),
                  "### Output length against full", length_table(lengths, protocol, length)]
        if engine:
            parts += ["### Engine: quality and throughput", engine_table(engine, protocol, length)]
    if not any(r.policy == FULL for r in runs):
        parts.append("No `full` run: ratios, losses and length changes need it.")
    return "\n\n".join(parts) + "\n"
