"""Perplexity against budget (CaM's Wikitext-2 / PG-19 curves): streaming perplexity of every method at every budget."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvmerge.eval import results
from kvmerge.eval.data import load_text
from kvmerge.eval.perplexity import streaming_perplexity
from kvmerge.registry import options_for

DEFAULT_BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def run_ppl_sweep(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: str,
    methods: list[str],
    budgets: list[float | int] = DEFAULT_BUDGETS,
    seeds: list[int] = (0,),
    tokens: int = 512,
    chunk: int = 1,
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    model_name: str = "default",
    options: dict | None = None,
    progress: bool = True,
    resume: bool = False,
) -> list[dict]:
    """Perplexity of the first ``tokens`` tokens of ``dataset`` (``wikitext2``, ``pg-essays`` or a file) per run.

    ``full`` runs once and is recorded at every budget (a flat reference line). Returns the
    :func:`~kvmerge.eval.perplexity.streaming_perplexity` dicts, one per (method, budget, seed), written
    to ``out_dir`` after every run; ``resume`` continues the runs ``out_dir`` holds
    (:class:`~kvmerge.eval.results.Ledger`).
    """
    text = load_text(dataset, data_dir)
    config = {
        "model": model_name,
        "dataset": dataset,
        "methods": methods,
        "budgets": list(budgets),
        "seeds": list(seeds),
        "tokens": tokens,
        "chunk": chunk,
        "options": options or {},
        "budget_semantics": "fraction of the scored tokens",
        "data_sha256": results.digest(text),
    }
    ledger = results.Ledger(out_dir, "ppl", config, resume)
    for method, budget, seed in tqdm(
        results.run_grid(methods, budgets, seeds, options), desc=f"ppl {dataset}", disable=not progress
    ):
        if ledger.done(method, budget, seed):
            continue
        run = streaming_perplexity(
            model, tokenizer, text, method, budget, tokens=tokens, chunk=chunk, seed=seed, progress=False,
            **options_for(method, options or {}),
        )  # fmt: skip
        run["dataset"] = dataset
        ledger.add([{**run, "budget": b} for b in budgets] if budget is None else [run])
    return ledger.records


def render(payload: dict, out_dir: Path) -> str:
    """Perplexity table (rows = method, columns = budget) and perplexity against budget, one line per method."""
    records = payload["records"]
    dataset = payload["config"]["dataset"]
    title = f"{dataset} perplexity"
    if len({r["budget"] for r in records}) == 1:  # one budget: bars per method, not lines of one point
        results.bar_plot(
            records, "budget", "method", "ppl", out_dir / "ppl.png", f"{title} at budget {records[0]['budget']}"
        )
    else:
        results.line_plot(records, "budget", "ppl", "method", out_dir / "ppl.png", title, logy=True)
    table = results.markdown_table(records, ("method",), "budget", "ppl", digits=2)
    return f"Perplexity on {dataset}, mean ± std over seeds (full = no budget, repeated).\n\n{table}\n\n![ppl](ppl.png)"
