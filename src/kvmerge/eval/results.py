"""Writing benchmark results: ``results.json`` (raw numbers), ``results.md`` (mean ± std tables) and PNG plots.

Every benchmark stores flat *records* (one dict per measurement: method, budget, seed, the
benchmark's own keys and numbers). :func:`render_report` rebuilds the table and plots of any
results folder from its ``results.json`` alone.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import math
import platform
import statistics
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from kvmerge.registry import draws_random, method_settings

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
# benchmark name -> module whose ``render(results: dict, out_dir: Path) -> str`` writes its plots and Markdown
BENCHMARKS = {
    "qa": "kvmerge.eval.qa",
    "summarization": "kvmerge.eval.summarization",
    "needle": "kvmerge.eval.needle",
    "perturbation": "kvmerge.eval.perturbation",
    "growth": "kvmerge.eval.growth",
    "ppl": "kvmerge.eval.sweep",
    "bench": "kvmerge.eval.bench",
    "demo": "kvmerge.eval.demo",
}


def is_seeded(method: str, options: dict | None = None) -> bool:
    """Whether ``method`` (with ``options``) draws random numbers (CaM's Bernoulli gate, the random selector):
    only those need several seeds."""
    return draws_random(method, options)


def run_grid(
    methods: list[str], budgets: list[float | int], seeds: list[int], options: dict | None = None
) -> list[tuple[str, float | int | None, int]]:
    """The (method, budget, seed) runs of a sweep: ``full`` once with budget ``None``; methods without
    randomness (with ``options``) with the first seed only."""
    return [
        (method, None if method == "full" else budget, seed)
        for method in methods
        for budget in ([None] if method == "full" else budgets)
        for seed in (seeds if is_seeded(method, options) else seeds[:1])
    ]


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that produce the numbers."""
    out = {"python": platform.python_version()}
    for package in ("kvmerge", "torch", "transformers", "lm_eval", "rouge-score"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def claim_out_dir(path: str | Path, force: bool = False, resume: bool | None = None) -> Path:
    """``path`` as the folder of a new run: refused while it holds files (the results of an earlier run)
    unless ``force`` (overwrite) or ``resume`` (continue, see :class:`Ledger`; ``None``: the command cannot
    resume); checked before any work, so that nothing is lost by mistake."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {path} is a file, not a folder")
    if force and resume:
        raise ValueError("--force starts over and --resume continues: give one of them")
    if not (force or resume) and path.is_dir() and any(path.iterdir()):
        hint = "pass --force to overwrite them" + (", --resume to continue them" if resume is not None else "")
        raise FileExistsError(f"{path} already holds results: {hint}, or choose another --out")
    return path


GRID_KEYS = ("methods", "budgets", "seeds")  # what a resumed run may extend; everything else must match
MATCHED_VERSIONS = ("kvmerge", "transformers")


def digest(*parts: str | bytes | Path) -> str:
    """SHA-256 (hex, first 16) of texts, bytes and files' contents, in order: what data a run read."""
    hasher = hashlib.sha256()
    for part in parts:
        data = part.read_bytes() if isinstance(part, Path) else part.encode() if isinstance(part, str) else part
        hasher.update(len(data).to_bytes(8, "little") + data)
    return hasher.hexdigest()[:16]


class ResumeRefused(ValueError):
    """A results folder that a run cannot continue (another benchmark, configuration, data or version)."""


class Ledger:
    """The records of a grid run, written to ``out_dir`` after every run so that an interrupted run keeps
    what it measured.

    With ``resume``, a folder that already holds this benchmark's results is continued: its records are
    kept, :meth:`done` says which runs they cover, and the grid lists (methods, budgets, seeds) of both
    invocations are joined. Every other configuration key, the data's ``data_sha256`` and the kvmerge and
    transformers versions must equal the folder's, or the run is refused before any compute (records
    measured on other data or code are never mixed).
    """

    def __init__(
        self, out_dir: str | Path | None, benchmark: str, config: dict, resume: bool = False, **extra_lists: list
    ):
        self.out_dir, self.benchmark, self.config = out_dir, benchmark, config
        self.records: list[dict] = []
        self.extra = extra_lists  # further lists kept beside the records (e.g. summarization's examples)
        if resume and out_dir is not None and (Path(out_dir) / RESULTS_JSON).exists():
            earlier = read_results(out_dir)
            self._check_matches(earlier)
            self.records = earlier["records"]
            self.extra = {name: earlier.get(name, []) + values for name, values in extra_lists.items()}
            self.config = {
                **config,
                **{
                    key: list(dict.fromkeys([*earlier["config"].get(key, []), *config.get(key, [])]))
                    for key in GRID_KEYS
                    if key in config
                },
            }

    def _check_matches(self, earlier: dict) -> None:
        path = Path(self.out_dir) / RESULTS_JSON
        if earlier["benchmark"] != self.benchmark:
            raise ResumeRefused(f"cannot resume {path}: it holds {earlier['benchmark']} results, not {self.benchmark}")
        mine = {k: json.loads(json.dumps(v, default=str)) for k, v in self.config.items() if k not in GRID_KEYS}
        theirs = {k: v for k, v in earlier["config"].items() if k not in (*GRID_KEYS, "settings")}
        current = versions()
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        differ += [f"{k} version" for k in MATCHED_VERSIONS if earlier["versions"].get(k) != current[k]]
        if differ:
            raise ResumeRefused(
                f"cannot resume {path}: its {', '.join(differ)} differ from this run's; use another --out "
                "(or --force to start over)"
            )

    def done(self, method: str, budget: float | int | None, seed: int, **keys) -> bool:
        """Whether a record of this run (and of ``keys``, e.g. a needle length) is already held; ``full``'s
        budget ``None`` matches any budget it was recorded at."""
        return any(
            r["method"] == method
            and r.get("seed", seed) == seed
            and (budget is None or r.get("budget") == budget)
            and all(r.get(k) == v for k, v in keys.items())
            for r in self.records
        )

    def add(self, records: list[dict], **extra_lists: list) -> None:
        """Keep a finished run's ``records`` (and items of the extra lists), then write everything."""
        self.records += records
        for name, values in extra_lists.items():
            self.extra[name] = self.extra.get(name, []) + values
        if self.out_dir is not None:
            write_results(self.out_dir, self.benchmark, self.config, self.records, **self.extra)


def write_results(out_dir: str | Path, benchmark: str, config: dict, records: list[dict], **extra) -> Path:
    """Write ``results.json`` (config, versions, records, ``extra``) into ``out_dir`` and render the report.

    Returns the path of ``results.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(config.get("methods"), (list, tuple)):  # what every option of every method ran with
        config = {**config, "settings": {m: method_settings(m, config.get("options")) for m in config["methods"]}}
    payload = {
        "benchmark": benchmark,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "versions": versions(),
        "records": records,
        **extra,
    }
    path = out / RESULTS_JSON
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    render_report(out)
    return path


def render_report(out_dir: str | Path) -> Path:
    """Re-render ``results.md`` and the plots of a results folder from its ``results.json``; returns the ``.md``."""
    out = Path(out_dir)
    results = read_results(out)
    body = importlib.import_module(BENCHMARKS[results["benchmark"]]).render(results, out)
    versions_line = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    config = json.dumps(results["config"], default=str)
    title = f"# {results['benchmark']} ({results['created']})"
    text = f"{title}\n\n{body}\n\nConfig: `{config}`\n\nVersions: {versions_line}\n"
    path = out / RESULTS_MD
    path.write_text(text)
    return path


def read_results(out_dir: str | Path) -> dict:
    """The ``results.json`` of a results folder, checked to be one kvmerge wrote (``ValueError`` if not)."""
    path = Path(out_dir) / RESULTS_JSON
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path} is not a kvmerge results file (not a JSON object)")
    missing = [key for key in ("benchmark", "created", "config", "versions") if key not in results]
    if missing:
        raise ValueError(f"{path} is not a kvmerge results file (no {', '.join(missing)})")
    if results["benchmark"] not in BENCHMARKS:
        raise ValueError(f"{path}: unknown benchmark {results['benchmark']!r}; kvmerge writes {', '.join(BENCHMARKS)}")
    return results


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def group(records: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    """Records grouped by the values of ``keys``, in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for record in records:
        out.setdefault(tuple(record.get(k) for k in keys), []).append(record)
    return out


def markdown_table(
    records: list[dict],
    rows: tuple[str, ...],
    column: str,
    value: str,
    scale: float = 1.0,
    digits: int = 1,
    mean_column: bool = False,
) -> str:
    """A Markdown table of ``value`` as mean ± std over seeds (and any other unlisted key).

    Parameters
    ----------
    records
        Flat measurement dicts.
    rows
        Keys whose values name a row (e.g. ``("method", "budget")``).
    column
        Key whose values name the columns (e.g. ``"task"``).
    value
        Key of the number shown; multiplied by ``scale``.
    mean_column
        Add a column with the mean over columns of the per-column means.
    """
    columns = list(group(records, (column,)))
    header = [*rows, *(str(c[0]) for c in columns)] + (["mean"] if mean_column else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row_key, row_records in group(records, rows).items():
        cells, means = [], []
        cell_groups = group(row_records, (column,))
        for col in columns:
            mean, std, n = mean_std(r[value] * scale for r in cell_groups.get(col, []))
            means.append(mean)
            cells.append("–" if n == 0 else f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else ""))
        if mean_column:
            cells.append(f"{mean_std(means)[0]:.{digits}f}")
        lines.append("| " + " | ".join(map(str, (*row_key, *cells))) + " |")
    return "\n".join(lines)


def line_plot(
    records: list[dict],
    x: str,
    y: str,
    line: str,
    path: Path,
    title: str,
    xlabel: str | None = None,
    ylabel: str | None = None,
    logy: bool = False,
) -> Path:
    """One line per value of ``line``: mean of ``y`` against ``x`` (error bars = std over the rest)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (name,), line_records in group(records, (line,)).items():
        points = sorted(group(line_records, (x,)).items(), key=lambda item: item[0][0])
        stats = [mean_std(r[y] for r in rs) for _, rs in points]
        ax.errorbar(
            [k[0] for k, _ in points], [s[0] for s in stats], yerr=[s[1] for s in stats], label=str(name), marker="o"
        )
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel or x, ylabel=ylabel or y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bar_plot(records: list[dict], group_key: str, bar_key: str, y: str, path: Path, title: str, scale: float = 1.0):
    """Grouped bars: one group per value of ``group_key``, one bar per value of ``bar_key``, height = mean ``y``."""
    groups = [g[0] for g in group(records, (group_key,))]
    bars = [b[0] for b in group(records, (bar_key,))]
    cells = group(records, (group_key, bar_key))
    width = 0.8 / max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(groups)), 4.2))
    for i, bar in enumerate(bars):
        heights = [mean_std(r[y] * scale for r in cells.get((g, bar), []))[0] for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], heights, width, label=str(bar))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [str(g) for g in groups], rotation=20)
    ax.set(title=title, ylabel=y)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
