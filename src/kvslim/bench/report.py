"""Human-readable results: the summary as a table (terminal via rich, markdown for ``report.md``) and the
report itself, which embeds the figures, the per-sample analysis and how every number was measured."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from . import detail, execute
from .config import Run

MIB = 2**20
_LIST_IDS = 8

HEADERS = ["task", "policy", "keep", "n", "acc / ppl", "out len vs full", "compression", "KV MiB (end)",
           "TTFT s", "TPOT ms", "tok/s", "peak MiB"]
SHORT_HEADERS = ["policy", "keep", "n", "acc", "len vs\nfull", "compr-\nession", "KV\nMiB", "TTFT\ns", "TPOT\nms",
                 "tok/s", "peak\nMiB"]
"""Terminal headers (one table per task, so no task column): an 80-column terminal shows every number whole."""


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, fmt)


def display_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Summary rows formatted for people: one list of cells per row, matching :data:`HEADERS`."""
    out = []
    for r in rows:
        quality = f"{r['accuracy']:.2f}" if r["accuracy"] is not None else f"ppl {_num(r['perplexity'], '.2f')}"
        change = r["output_change_vs_full"]
        out.append([
            r["task"], r["policy"], _num(r["keep"], "g"), str(r["n"]), quality,
            "-" if change is None else f"{100 * change:+.0f}%", _num(r["compression"], ".2f") + ("x" if r["compression"] else ""),
            _num(r["kv_bytes_end"], ".1f", 1 / MIB), _num(r["ttft_s"], ".2f"), _num(r["tpot_s"], ".0f", 1e3),
            _num(r["tokens_per_s"], ".1f"), _num(r["peak_mem_bytes"], ".0f", 1 / MIB),
        ])
    return out


def print_summary(rows: Sequence[dict[str, Any]], title: str, console: Console | None = None) -> None:
    """One rich table per task (quality is accuracy, or perplexity for perplexity tasks)."""
    console = console or Console()
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        headers = list(SHORT_HEADERS)
        if mine[0]["accuracy"] is None:
            headers[3] = "ppl"
        table = Table(title=f"{task}: {title}", box=box.SIMPLE_HEAD, padding=0, collapse_padding=True)
        for h in headers:
            table.add_column(h, justify="left" if h == "policy" else "right", no_wrap=h != "policy")
        for cells in display_rows(mine):
            table.add_row(*cells[1:4], cells[4].removeprefix("ppl "), *cells[5:])
        console.print(table)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _length_table(rows: Sequence[dict[str, Any]], runs: Sequence[Run]) -> str:
    """Accuracy (or perplexity) per run (rows) and task @ length (columns)."""
    columns = list(dict.fromkeys((r["task"], r["length"]) for r in rows))
    cell = {(r["task"], r["length"], r["policy"], r["keep"]): r for r in rows}
    body = []
    for run in runs:
        line = [run.label]
        for task, length in columns:
            r = cell.get((task, length, run.policy, run.keep))
            if r is None:
                line.append("-")
            elif r["accuracy"] is not None:
                line.append(f"{r['accuracy']:.2f} (n={r['n']})")
            else:
                line.append(f"ppl {r['perplexity']:.2f} (n={r['n']})")
        body.append(line)
    return markdown_table(["policy"] + [f"{t} @ {n}" for t, n in columns], body)


def _setting(value: Any) -> str:
    return ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)


def _ids(ids: Sequence[str]) -> str:
    if not ids:
        return "0"
    more = f" (+{len(ids) - _LIST_IDS} more)" if len(ids) > _LIST_IDS else ""
    return f"{len(ids)}: {', '.join(ids[:_LIST_IDS])}{more}"


def _flip_section(flips: Sequence[dict[str, Any]], runs: Sequence[Run], has_full: bool) -> str:
    if not has_full:
        return "No `full` run in this benchmark, so there is no reference to pair samples with."
    parts = []
    for run in runs:
        if run.policy == "full":
            continue
        mine = [f for f in flips if (f["policy"], f["keep"]) == (run.policy, run.keep)]
        parts.append(f"### {run.label}\n")
        if not mine:
            parts.append("No sample changes its verdict against `full`.\n")
            continue
        body = [[f["task"], str(f["length"]), f["depth"] or "-", str(f["paired"]), _ids(f["lost"]), _ids(f["gained"])]
                for f in mine]
        parts.append(markdown_table(["task", "length", "depth", "paired", "lost (full right, policy wrong)",
                                     "gained (policy right, full wrong)"], body) + "\n")
    return "\n".join(parts)


def _measurement_notes(settings: dict[str, Any]) -> str:
    kinds = {
        "cuda_max_allocated": "`torch.cuda.max_memory_allocated`, reset before each batch (weights included)",
        "rss_peak": "the process's peak resident set size (VmHWM), reset before each batch through "
                    "`/proc/self/clear_refs` (weights and Python included)",
        "rss_lifetime_peak": "the process's lifetime peak resident set size (`resource.getrusage`); it cannot be "
                             "reset here, so it only grows over the run",
    }
    chat = ("the tokenizer's chat template around instruction, context and question, with the assistant turn "
            "started by the task's answer prefix" if settings["chat"] else
            "the task's plain prompt (instruction, context, question, answer prefix), no chat template")
    return "\n".join([
        f"- **Prompt format**: {chat}. {settings['chat_note']}",
        "- **Generation**: greedy, batched with left padding (`kvslim.generate_ids`), up to the task's answer "
        "budget of new tokens; the policy compresses the cache after the prompt is attended in full.",
        "- **Score**: fraction of gold answers found in the output, case-insensitive (RULER's metric); "
        "a sample is *right* when all are found.",
        "- **KV bytes**: bytes the cache storage actually holds per sequence (codes, scales and indices "
        "included), after prefill and at the end; *compression* is full-cache bytes for the same tokens over "
        "bytes held at the end (summary: ratio of the means).",
        "- **TTFT**: prefill plus first token; **TPOT**: mean time per later decoding step; **tok/s**: output "
        "tokens over the whole generation time, prefill included (per sequence; sequences of a batch share its "
        "time).",
        f"- **Peak memory**: {kinds.get(settings['peak_mem_kind'], settings['peak_mem_kind'])}.",
        f"- **Machine load**: mean 1-minute load average {settings['mean_load_avg']} over {settings['cpus']} "
        "cores while samples ran (per sample: `load_avg` in `samples.jsonl`); above the core count, other work "
        "competed for the CPU and latencies are inflated. Runs alternate sample by sample, so all policies "
        "share the same conditions.",
        "- **Output length vs full**: mean output tokens over the samples both ran, relative to full.",
        f"- **Perplexity protocol**: {execute.PERPLEXITY_PROTOCOL}",
    ])


def _wrong_section(records: Sequence[dict[str, Any]], runs: Sequence[Run]) -> str:
    rows = detail.wrong_answers(records, runs)
    if not rows:
        return "Every generated answer is right."
    return (f"Up to {detail.PER_RUN} wrong answers per run, with every field recorded for them (`samples.jsonl` "
            "has all samples); *full's output* is the full cache's answer to the same prompt.\n\n"
            + markdown_table(detail.HEADERS, rows))


def write_report(settings: dict[str, Any], rows: Sequence[dict[str, Any]], length_rows: Sequence[dict[str, Any]],
                 flips: Sequence[dict[str, Any]], runs: Sequence[Run], figures: Sequence[tuple[str, str]],
                 records: Sequence[dict[str, Any]]) -> str:
    """The markdown report: settings, tables, figures, per-sample analysis, measurement notes."""
    setting_rows = [[k, _setting(v)] for k, v in settings.items() if k not in ("chat_note", "specs", "command")]
    spec_rows = [[label, f"`{spec}`"] for label, spec in settings["specs"].items()]
    figure_md = "\n\n".join(f"### {title}\n\n![{title}]({name})" for title, name in figures) or "No figures."
    return "\n\n".join([
        f"# kvslim benchmark: {settings['model']}",
        f"Reproduce or resume with `{settings['command']}`.",
        markdown_table(["setting", "value"], setting_rows),
        "Policy runs and the full parameters they ran with:",
        markdown_table(["run", "spec"], spec_rows),
        "## Summary (pooled over lengths)",
        markdown_table(HEADERS, display_rows(rows)),
        "## By length",
        _length_table(length_rows, runs),
        "## Figures",
        figure_md,
        "## Per-sample analysis against full",
        "Samples the full cache gets right and the policy gets wrong (*lost*), and the reverse (*gained*), "
        "grouped by task, length and needle depth; *paired* counts the samples both ran in that group. "
        "Each sample's prompt length, answer and generated text are in `samples.jsonl`.",
        _flip_section(flips, runs, any(r.policy == "full" for r in runs)),
        "## Wrong answers in detail",
        _wrong_section(records, runs),
        "## How it was measured",
        _measurement_notes(settings),
    ]) + "\n"
