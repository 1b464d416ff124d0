"""The RULER figure: average score against KV bytes held, one line per method over its keeps, full as
the reference, one panel per protocol and length. Built on ``matplotlib.figure.Figure`` (no pyplot, no
display needed)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .leaderboard import FULL, settings

MIB = 2**20
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
            "#7f7f7f", "#393b79", "#637939"]
#: a method past the palette's length takes the next marker, so no two lines look alike
_MARKERS = "osD^v"


def score_vs_kv(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """``rows`` are :func:`.leaderboard.board` rows; returns the PNG written, or None with nothing to plot."""
    panels = settings(rows)
    if not panels:
        return None
    policies = [p for p in dict.fromkeys(r["policy"] for r in rows) if p != FULL]
    colors = {p: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(policies)}
    markers = {p: _MARKERS[i // len(_PALETTE) % len(_MARKERS)] for i, p in enumerate(policies)}
    fig = Figure(figsize=(6.2 * len(panels), 4.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (protocol, length) in zip(axes, panels):
        mine = [r for r in rows if (r["protocol"], r["length"]) == (protocol, length)]
        for r in (r for r in mine if r["policy"] == FULL):
            ax.axhline(r["score"], color="black", linestyle="--", linewidth=1)
            ax.plot(r["kv_bytes"] / MIB, r["score"], "*", color="black", markersize=12, label="full")
        for policy in policies:
            line = sorted((r for r in mine if r["policy"] == policy), key=lambda r: r["kv_bytes"])
            if not line:
                continue
            ax.plot([r["kv_bytes"] / MIB for r in line], [r["score"] for r in line], f"{markers[policy]}-", color=colors[policy],
                    label=policy)
            for r in line:
                if r["keep"] is not None:
                    ax.annotate(f"{r['keep']:g}", (r["kv_bytes"] / MIB, r["score"]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=colors[policy])
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.set_xlabel("KV MiB held per sequence after the prompt")
        ax.set_ylabel("RULER average score")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{protocol}, {length} tokens")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", title="method (points: keep)")
    fig.suptitle("RULER score against KV memory")
    fig.savefig(path, dpi=110)
    return path
