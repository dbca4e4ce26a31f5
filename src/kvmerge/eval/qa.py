"""CaM Table 1: zero-shot lm-eval multiple-choice accuracy of each method at a fixed budget."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvmerge.eval import harness, results
from kvmerge.eval.data import data_folder
from kvmerge.eval.paired import paired_bootstrap
from kvmerge.registry import options_for

METRIC = "acc"


def run_qa(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: list[str],
    budgets: list[float | int],
    seeds: list[int],
    tasks: tuple[str, ...] = harness.QA_TASKS,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 32,
    chunk: int = 1,
    data_dir: str | Path | None = None,
    model_name: str = "default",
    options: dict | None = None,
    progress: bool = True,
    resume: bool = False,
) -> list[dict]:
    """Accuracy of every (method, budget, seed) on ``tasks`` through lm-eval's ``simple_evaluate``.

    ``full`` runs once (no budget); methods without randomness run with the first seed only.
    Writes ``results.json``/``results.md``/``qa.png`` into ``out_dir`` (when given) after every task of
    every run; ``resume`` continues the ones ``out_dir`` holds (see :class:`~kvmerge.eval.results.Ledger`).

    Returns
    -------
    list of dict
        One record per (method, budget, seed, task): ``acc``, ``acc_stderr``, ``acc_norm`` (if the task
        has it), ``n`` documents, ``outcomes`` (per document 0/1, in document order, so that any two
        methods can be compared pairwise later) and ``seconds`` (of that task).
    """
    import lm_eval

    harness.register()
    manager = harness.task_manager(data_dir, include_defaults=not all(t in harness.QA_TASKS for t in tasks))
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    runs = results.run_grid(methods, budgets, seeds, options)
    config = {
        "model": model_name,
        "methods": methods,
        "budgets": budgets,
        "seeds": seeds,
        "tasks": list(tasks),
        "limit": limit,
        "chunk": chunk,
        "batch_size": batch_size,
        "options": options or {},
        "budget_semantics": "fraction of each scored sequence (context + continuation), causal eviction",
        "data_sha256": task_digest(tasks, data_dir),
    }
    ledger = results.Ledger(out_dir, "qa", config, resume)
    cells = [(run, task) for run in runs for task in tasks]
    for (method, budget, seed), task in tqdm(cells, desc="qa runs", disable=not progress):
        name = task.removeprefix("kvmerge_")
        if ledger.done(method, budget, seed, task=name):
            continue
        lm = harness.KVMergeLM(
            model, tokenizer, method=method, budget=budget, seed=seed, chunk=chunk, batch_size=batch_size,
            progress=progress, **options_for(method, options or {}),
        )  # fmt: skip
        start = time.perf_counter()
        with harness.quiet_git():
            out = lm_eval.simple_evaluate(
                model=lm, tasks=[task], limit=limit, task_manager=manager, verbosity="WARNING", log_samples=True
            )
        metrics = out["results"][task]
        ledger.add(  # after every task of every run, so that an interrupted sweep keeps what it measured
            [
                {
                    "method": method,
                    "budget": budget,
                    "seed": seed,
                    "task": name,
                    "acc": metrics["acc,none"],
                    "acc_stderr": metrics.get("acc_stderr,none"),
                    "acc_norm": metrics.get("acc_norm,none"),
                    "n": out["n-samples"][task]["effective"],
                    "seconds": time.perf_counter() - start,
                    "outcomes": outcomes(out["samples"][task]),
                }
            ]
        )
    return ledger.records


def task_digest(tasks: tuple[str, ...], data_dir: str | Path | None) -> str | None:
    """:func:`~kvmerge.eval.results.digest` of the data files of kvmerge's ``tasks`` (``None`` if none is)."""
    folders = [task.removeprefix("kvmerge_") for task in tasks if task in harness.QA_TASKS]
    if not folders:
        return None
    root = data_folder(data_dir)
    return results.digest(*(path for name in sorted(folders) for path in sorted((root / name).glob("*.jsonl"))))


def outcomes(samples: list[dict]) -> list[int]:
    """Per-document correctness (0/1) in document order, from lm-eval's logged samples."""
    return [int(sample[METRIC]) for sample in sorted(samples, key=lambda sample: sample["doc_id"])]


def paired_differences(records: list[dict]) -> list[dict]:
    """``selector+absorber`` against its selector at the same budget and seed, per task: the paired
    bootstrap of their per-document outcomes (:func:`~kvmerge.eval.paired.paired_bootstrap`)."""
    by = {(r["method"], r["budget"], r["seed"], r["task"]): r for r in records if "outcomes" in r}
    out = []
    for (method, budget, seed, task), record in by.items():
        selector = method.partition("+")[0]
        base = by.get((selector, budget, seed, task)) or by.get((selector, budget, 0, task))
        if "+" in method and base is not None:
            compared = paired_bootstrap(base["outcomes"], record["outcomes"])
            out.append({"task": task, "method": method, "versus": selector, "budget": budget, "seed": seed, **compared})
    return out


def render(payload: dict, out_dir: Path) -> str:
    """Table 1 shape (rows = methods, columns = tasks): accuracy in % with its documents, ``*`` where a
    method differs from its selector with a 95% paired bootstrap interval that excludes 0, the paired
    differences themselves, and a grouped bar plot."""
    records = payload["records"]
    results.bar_plot(records, "task", "method", METRIC, out_dir / "qa.png", "Zero-shot accuracy (%)", scale=100)
    differences = paired_differences(records)
    marked = {(d["method"], d["budget"], d["task"]) for d in differences if d["excludes_zero"]}
    tasks = list(dict.fromkeys(r["task"] for r in records))
    lines = ["| method | budget | " + " | ".join(tasks) + " | mean |", "|---|---|" + "---|" * (len(tasks) + 1)]
    for (method, budget), rows in results.group(records, ("method", "budget")).items():
        cells, means = [], []
        for task in tasks:
            cell = [r for r in rows if r["task"] == task]
            mean, std, count = results.mean_std(100 * r[METRIC] for r in cell)
            means.append(mean)
            spread = f" ± {std:.1f}" if count > 1 else ""
            documents = f" ({cell[0]['n']})" if count and "n" in cell[0] else ""
            star = "*" if (method, budget, task) in marked else ""
            cells.append("–" if not count else f"{mean:.1f}{spread}{documents}{star}")
        cells.append(f"{results.mean_std(means)[0]:.1f}")
        lines.append(f"| {method} | {budget} | " + " | ".join(cells) + " |")
    text = (
        "Accuracy (%) (documents), mean ± std over seeds; * = differs from its selector (95% paired "
        "bootstrap interval excludes 0).\n\n" + "\n".join(lines)
    )
    if differences:
        rows = [
            f"| {d['task']} | {d['method']} vs {d['versus']} | {d['budget']} | {d['seed']} | {100 * d['diff']:+.1f} "
            f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] | {d['n']} |"
            for d in differences
        ]
        text += (
            "\n\nPaired differences (percentage points, 95% bootstrap interval, 10,000 resamples):\n\n"
            "| task | comparison | budget | seed | difference [interval] | n |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows)
        )
    return f"{text}\n\n![accuracy](qa.png)\n\nWall time of all runs: {sum(r['seconds'] for r in records):.0f} s."


def cell_command(config: dict, task: str, method: str, budget, seed: int) -> str:
    """The ``kvmerge eval qa`` command that measures one cell of a results folder again, alone."""
    parts = [
        "kvmerge eval qa",
        f"--tasks kvmerge_{task}",
        f"--methods {method}",
        *([] if budget is None else [f"--budgets {budget}"]),
        f"--seeds {seed}",
        *([] if config.get("limit") is None else [f"--limit {config['limit']}"]),
        f"--batch-size {config['batch_size']}",
        f"--chunk {config['chunk']}",
        *(f"--option {key}={value}" for key, value in sorted((config.get("options") or {}).items())),
        *([] if config.get("model", "default") == "default" else [f"--model {config['model']}"]),
        f"--out runs/cell-{task}-{method}",
    ]
    return " ".join(parts)


def publish(payload: dict) -> dict:
    """A ``qa`` results folder's payload as the citable JSON of a table: per task and method (``method``,
    ``method@budget``, ``@seed`` for seeded methods) the accuracy, documents, per-document outcomes
    (as a 0/1 string) with their SHA-256, and the command that measures that cell again; the paired
    intervals of every ``selector+absorber`` against its selector; the model, data digest and versions."""
    config = payload["config"]
    cells: dict[str, dict[str, dict]] = {}
    for r in payload["records"]:
        name = r["method"] + ("" if r["budget"] is None else f"@{r['budget']}")
        name += f"@seed{r['seed']}" if results.is_seeded(r["method"], config.get("options")) else ""
        outcomes = "".join(map(str, r["outcomes"]))
        cells.setdefault(r["task"], {})[name] = {
            "acc": r[METRIC],
            "n": r["n"],
            "outcomes": outcomes,
            "outcomes_sha256": results.digest(outcomes),
            "seconds": round(r["seconds"], 1),
            "command": cell_command(config, r["task"], r["method"], r["budget"], r["seed"]),
        }
    keep = ("model", "limit", "chunk", "batch_size", "options", "budget_semantics", "data_sha256", "settings")
    return {
        "benchmark": "qa",
        "created": payload["created"],
        "config": {key: config[key] for key in keep if key in config},
        "versions": payload["versions"],
        "cells": cells,
        "paired": paired_differences(payload["records"]),
    }
