"""Plain-text tables and the perplexity/memory plot of perplexity results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

MIB = 1 << 20
_FULL, _EVICT, _CAM = "#7f7f7f", "#1f77b4", "#d62728"
_LEGEND = {"full cache": _FULL, "eviction": _EVICT, "eviction + CaM merging": _CAM}


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Align ``rows`` under ``header``: text left, numbers right (floats with 2 decimals)."""
    cells = [[_cell(value) for value in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(header))]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        aligned = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))
        return "  ".join(aligned).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def results_table(results: Sequence[dict], budget: bool = True) -> str:
    """One row per :func:`~kvmerge.eval.streaming_perplexity` result: method, (budget,) ppl, KV memory, time."""
    header = ["method", *(["budget"] if budget else []), "ppl", "KV MiB held", "% of full", "seconds"]
    rows = [
        [
            r["method"],
            *([_budget(r)] if budget else []),
            r["ppl"],
            r["kv_bytes"] / MIB,
            100 * r["kv_bytes"] / r["kv_bytes_full"],
            r["seconds"],
        ]
        for r in results
    ]
    return format_table(rows, header)


def plot_ppl_memory(results: Sequence[dict], path: Path | str, title: str = "") -> Path:
    """Save a PNG: perplexity per method (left) and K/V memory held vs the full cache (right)."""
    methods = [r["method"] for r in results]
    ppl = [r["ppl"] for r in results]
    held = [r["kv_bytes"] / MIB for r in results]
    full = [r["kv_bytes_full"] / MIB for r in results]
    colors = [_FULL if m == "full" else _CAM if m.endswith("+cam") else _EVICT for m in methods]
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    bars = left.bar(methods, ppl, color=colors)
    left.bar_label(bars, fmt="%.2f", fontsize=9)
    left.set_ylabel("perplexity (lower is better)")
    left.set_title("streaming perplexity")
    left.set_ylim(0, max(ppl) * 1.3)
    handles = [Patch(color=color, label=label) for label, color in _LEGEND.items()]
    left.legend(handles=handles, loc="upper left", fontsize=9)
    right.bar(methods, full, color="none", edgecolor=_FULL, linestyle="--", label="full cache")
    bars = right.bar(methods, held, color=colors, label="held")
    right.bar_label(bars, labels=[f"{100 * h / f:.0f}%" for h, f in zip(held, full, strict=True)], fontsize=9)
    right.set_ylabel("K/V memory (MiB)")
    right.set_title("KV cache held at the end (% of full)")
    right.legend(
        handles=[Patch(facecolor="none", edgecolor=_FULL, linestyle="--", label="full cache")],
        loc="upper left",
        fontsize=9,
    )
    right.set_ylim(0, max(full) * 1.3)
    for axes in (left, right):
        for label in axes.get_xticklabels():
            label.set(rotation=40, ha="right", rotation_mode="anchor")
        axes.grid(axis="y", alpha=0.3)
    if title:
        figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def _budget(result: dict) -> str:
    if result["budget"] is None:
        return "-"
    if isinstance(result["budget"], float):
        return f"{result['budget']:g} ({result['budget_tokens']})"
    return str(result["budget"])


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
