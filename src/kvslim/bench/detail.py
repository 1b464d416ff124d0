"""The per-sample table of ``report.md``: every field recorded for a sample, shown for the samples worth
reading, the wrong answers, each beside the full cache's output for the same prompt. A reader sees *how*
a method fails (a truncated key, a neighbouring number, filler text) without opening ``samples.jsonl``."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import Run
from .metrics import FULL

PER_RUN = 8
"""Wrong answers listed per policy run; ``samples.jsonl`` holds all of them."""
_TEXT = 48
KIB, MIB = 2**10, 2**20

HEADERS = ["run", "task", "length", "depth", "sample", "prompt tok", "answer", "output", "full's output", "score",
           "out tok", "KV KiB prefill", "KV KiB end", "TTFT s", "TPOT ms", "peak MiB"]


def _text(value: Any) -> str:
    """A cell for generated or gold text: one line, pipes escaped, long text cut with an ellipsis."""
    text = ", ".join(value) if isinstance(value, list) else str(value)
    text = text.replace("\n", "⏎").replace("|", "\\|").strip()
    return f"`{text[:_TEXT]}…`" if len(text) > _TEXT else f"`{text}`"


def _row(label: str, r: dict[str, Any], ref: dict[str, Any] | None) -> list[str]:
    return [
        label, r["task"], str(r["length"]), "-" if r["depth"] is None else f"{r['depth']:.2f}", r["sample_id"],
        str(r["prompt_tokens"]), _text(r["answer"]), _text(r["output"]), "-" if ref is None else _text(ref["output"]),
        f"{r['score']:.2f}", str(r["output_tokens"]), f"{r['kv_bytes_prefill'] / KIB:.0f}",
        f"{r['kv_bytes_end'] / KIB:.0f}", f"{r['ttft_s']:.2f}", f"{1e3 * r['tpot_s']:.0f}",
        "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / MIB:.0f}",
    ]


def wrong_answers(records: Sequence[dict[str, Any]], runs: Sequence[Run]) -> list[list[str]]:
    """Rows of :data:`HEADERS`: up to :data:`PER_RUN` wrong answers per run, in run order, then by task,
    length and sample; a non-full run's row carries full's output for the same prompt."""
    full = {(r["task"], r["length"], r["sample_id"]): r for r in records if r["policy"] == FULL}
    rows = []
    for run in runs:
        mine = sorted((r for r in records if (r["policy"], r["keep"]) == (run.policy, run.keep)
                       and r["correct"] is False), key=lambda r: (r["task"], r["length"], r["sample_id"]))
        for r in mine[:PER_RUN]:
            ref = None if run.policy == FULL else full.get((r["task"], r["length"], r["sample_id"]))
            rows.append(_row(run.label, r, ref))
    return rows
