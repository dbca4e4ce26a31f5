"""CaM Table 1: zero-shot lm-eval multiple-choice accuracy of each method at a fixed budget."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvmerge.eval import harness, results
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
) -> list[dict]:
    """Accuracy of every (method, budget, seed) on ``tasks`` through lm-eval's ``simple_evaluate``.

    ``full`` runs once (no budget); methods without randomness run with the first seed only.
    Writes ``results.json``/``results.md``/``qa.png`` into ``out_dir`` (when given) after every run.

    Returns
    -------
    list of dict
        One record per (method, budget, seed, task): ``acc``, ``acc_stderr``, ``acc_norm`` (if the task
        has it), ``n`` documents and ``seconds``.
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
    }
    records = []
    for method, budget, seed in tqdm(runs, desc="qa runs", disable=not progress):
        lm = harness.KVMergeLM(
            model, tokenizer, method=method, budget=budget, seed=seed, chunk=chunk, batch_size=batch_size,
            progress=progress, **options_for(method, options or {}),
        )  # fmt: skip
        start = time.perf_counter()
        with harness.quiet_git():
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), limit=limit, task_manager=manager, verbosity="WARNING"
            )
        seconds = time.perf_counter() - start
        for task in tasks:
            metrics = out["results"][task]
            records.append(
                {
                    "method": method,
                    "budget": budget,
                    "seed": seed,
                    "task": task.removeprefix("kvmerge_"),
                    "acc": metrics["acc,none"],
                    "acc_stderr": metrics.get("acc_stderr,none"),
                    "acc_norm": metrics.get("acc_norm,none"),
                    "n": out["n-samples"][task]["effective"],
                    "seconds": seconds,
                }
            )
        if out_dir is not None:  # after every run, so that an interrupted sweep keeps what it measured
            results.write_results(out_dir, "qa", config, records)
    return records


def render(payload: dict, out_dir: Path) -> str:
    """Table 1 shape (rows = methods, columns = tasks, accuracy in %) and a grouped bar plot."""
    records = payload["records"]
    results.bar_plot(records, "task", "method", METRIC, out_dir / "qa.png", "Zero-shot accuracy (%)", scale=100)
    seconds = {(r["method"], r["budget"], r["seed"]): r["seconds"] for r in records}
    table = results.markdown_table(records, ("method", "budget"), "task", METRIC, scale=100, mean_column=True)
    return (
        f"Accuracy (%), mean ± std over seeds, {payload['config'].get('limit') or 'all'} documents per task.\n\n"
        f"{table}\n\n![accuracy](qa.png)\n\nWall time of all runs: {sum(seconds.values()):.0f} s."
    )
