"""The run's PNG figures. Built on ``matplotlib.figure.Figure`` (no pyplot), so plotting never needs a
display or touches global state, and works the same in a headless job.

Each function returns the file it wrote, or None when the data has nothing to show.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .analysis import depth_labeler
from .config import Run
from .metrics import FULL

MARKERS = "osD^vP*X"
MIB = 2**20
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def _colors(runs: Sequence[Run]) -> dict[str, str]:
    """One color per policy (all its keeps share it); the full cache is black."""
    policies = [p for p in dict.fromkeys(r.policy for r in runs) if p != FULL]
    colors = {p: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(policies)}
    return {FULL: "black", **colors} if any(r.policy == FULL for r in runs) else colors


def _grid(n: int, width: float = 5.0, height: float = 4.0, cols: int = 3) -> tuple[Figure, list[Any]]:
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def accuracy_vs_bytes(rows: Sequence[dict[str, Any]], tasks: Sequence[str], runs: Sequence[Run],
                      path: Path) -> Path | None:
    """Per task: accuracy (perplexity for perplexity tasks) against KV bytes held at the end, one line per
    policy and length through its keep fractions; the full cache is the black star."""
    tasks = [t for t in tasks if any(r["task"] == t for r in rows)]
    if not tasks:
        return None
    colors = _colors(runs)
    lengths = sorted({r["length"] for r in rows})
    marker = {n: MARKERS[i % len(MARKERS)] for i, n in enumerate(lengths)}
    # Policies often tie (same bytes, same accuracy): earlier ones are drawn larger and underneath, with a
    # white edge, so a tie shows as concentric rings instead of hiding a policy.
    order = {p: i for i, p in enumerate(c for c in colors if c != FULL)}
    keeps = sorted({r.keep for r in runs if r.keep is not None})
    label_keeps = len(keeps) > 1  # with one keep fraction the legend title states it once
    fig, axes = _grid(len(tasks), width=5.5, height=4.5)
    for ax, task in zip(axes, tasks):
        task_rows = [r for r in rows if r["task"] == task]
        metric = "perplexity" if task_rows[0]["accuracy"] is None else "accuracy"
        lines: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        for r in task_rows:
            lines[(r["policy"], r["length"])].append(r)
        for (policy, length), pts in lines.items():
            pts.sort(key=lambda r: r["kv_bytes_end"])
            xs = [r["kv_bytes_end"] / MIB for r in pts]
            ys = [r[metric] for r in pts]
            rank = order.get(policy, 0)
            style = ({"marker": "*", "markersize": 14} if policy == FULL else
                     {"marker": marker[length], "markersize": 6 + 2.5 * (len(order) - 1 - rank), "zorder": 3 + rank})
            ax.plot(xs, ys, color=colors[policy], linewidth=1.5, markeredgecolor="white", markeredgewidth=0.8,
                    **style)
            for r, x, y in zip(pts, xs, ys):
                if label_keeps and r["keep"] is not None:
                    ax.annotate(f"{r['keep']:g}", (x, y), textcoords="offset points", xytext=(6, 3 + 8 * (rank % 3)),
                                fontsize=8, color=colors[policy])
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.15, y=0.1)
        ax.set_title(task)
        ax.set_xlabel("KV cache held per sequence at the end (MiB, log)")
        ax.set_ylabel(metric)
        if metric == "accuracy":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=c, marker="*" if p == FULL else "o", linestyle="-", label=p)
               for p, c in colors.items()]
    if len(lengths) > 1:
        handles += [Line2D([], [], color="gray", marker=marker[n], linestyle="", label=f"{n} tokens") for n in lengths]
    title = ("policy (point labels: keep fraction)" if label_keeps else
             f"policy (keep fraction {keeps[0]:g} where it applies)" if keeps else "policy")
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), title=title)
    fig.suptitle("Quality against KV memory")
    fig.savefig(path, dpi=110)
    return path


def depth_heatmaps(records: Sequence[dict[str, Any]], task: str, runs: Sequence[Run], path: Path) -> Path | None:
    """Accuracy per (depth bin, length), one panel per policy run: where in the context answers get lost."""
    records = [r for r in records if r["task"] == task and r["depth"] is not None and r["correct"] is not None]
    present = [run for run in runs if any((r["policy"], r["keep"]) == (run.policy, run.keep) for r in records)]
    if not present:
        return None
    label = depth_labeler(task)
    bins = sorted({label(r["depth"]) for r in records}, key=lambda b: float(b.split("-")[0]))
    lengths = sorted({r["length"] for r in records})
    cols = min(4, len(present))
    # A panel is narrow when there are few lengths; the figure keeps room for its two-line title.
    width = max(1.6 + 1.3 * len(lengths), 5.5 / cols)
    fig, axes = _grid(len(present), width=width, height=1.6 + 0.55 * len(bins), cols=cols)
    image = None
    for ax, run in zip(axes, present):
        cells: dict[tuple[str, int], list[float]] = defaultdict(list)
        for r in records:
            if (r["policy"], r["keep"]) == (run.policy, run.keep):
                cells[(label(r["depth"]), r["length"])].append(r["score"])
        grid = [[sum(cells[(b, n)]) / len(cells[(b, n)]) if cells[(b, n)] else math.nan for n in lengths] for b in bins]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i, b in enumerate(bins):
            for j, n in enumerate(lengths):
                if cells[(b, n)]:
                    dark = grid[i][j] < 0.2 or grid[i][j] > 0.85  # ends of the colour map: white text reads better
                    ax.text(j, i, f"{grid[i][j]:.2f}\n(n={len(cells[(b, n)])})", ha="center", va="center",
                            fontsize=9, color="white" if dark else "black")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(bins)), bins)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(run.label)
    if image is not None:
        fig.colorbar(image, ax=axes, label="accuracy", shrink=0.8)
    fig.suptitle(f"{task}: accuracy by needle depth and context length\n(depth 0 = start of the context, 1 = end)")
    fig.savefig(path, dpi=110)
    return path


def output_length_change(rows: Sequence[dict[str, Any]], tasks: Sequence[str], runs: Sequence[Run],
                         path: Path) -> Path | None:
    """Change of mean output length against the full cache, per policy run and task (paired samples):
    compression can make a model ramble or stop early, which changes decode cost as much as quality."""
    rows = [r for r in rows if r["policy"] != FULL and r["output_change_vs_full"] is not None
            and r["accuracy"] is not None]
    labels = [run.label for run in runs if any((r["policy"], r["keep"]) == (run.policy, run.keep) for r in rows)]
    tasks = [t for t in tasks if any(r["task"] == t for r in rows)]
    if not labels:
        return None
    value = {(Run(r["policy"], r["keep"]).label, r["task"]): 100 * r["output_change_vs_full"] for r in rows}
    fig = Figure(figsize=(max(6.0, 1.0 + 0.9 * len(labels) * max(1, len(tasks)) ** 0.5), 4.2), layout="constrained")
    ax = fig.subplots()
    width = min(0.8 / len(tasks), 0.4)
    for t, task in enumerate(tasks):
        xs = [i + (t - (len(tasks) - 1) / 2) * width for i in range(len(labels))]
        heights = [value.get((label, task), math.nan) for label in labels]  # nan: this run skipped the task
        bars = ax.bar(xs, heights, width, label=task)
        ax.bar_label(bars, labels=["" if math.isnan(h) else f"{h:+.0f}%" for h in heights], fontsize=8, padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.15)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("mean output length vs full (%)")
    ax.set_title("Output length change against the full cache")
    ax.legend(title="task")
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)
    return path
