"""The demo: full vs StreamingLLM vs CaM vs H2O vs TOVA vs the other step-schedule selectors, token by token
on the Paul Graham essays. (SnapKV and KVMerger compress once after a prompt, and LESS needs trained kernels:
the needle benchmark compares them.)"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import kvmerge
from kvmerge.eval import results
from kvmerge.eval.data import load_text
from kvmerge.eval.perplexity import PerplexityRun, prepare_perplexity
from kvmerge.eval.report import plot_ppl_memory, results_table

DEMO_METHODS = (
    "full", "streaming", "streaming+cam", "h2o", "h2o+cam", "tova", "scissorhands", "corm", "knorm", "random",
)  # fmt: skip


@dataclass
class Demo:
    """Validated demo runs, one per method, ready to :meth:`run`; build it with :func:`prepare_demo`."""

    runs: list[PerplexityRun]
    config: dict
    out: Path

    def run(self, progress: bool = True) -> dict:
        """Run every method; write ``results.json``, ``results.md`` and ``ppl_memory.png`` under :attr:`out`
        and return what ``results.json`` holds: ``benchmark`` ("demo"), ``created``, ``config``,
        ``versions``, ``torch_threads`` and ``results`` (one
        :func:`~kvmerge.eval.streaming_perplexity` result per method)."""
        record = {
            "benchmark": "demo",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": self.config,
            "versions": results.versions(),
            "torch_threads": torch.get_num_threads(),
            "results": [run.run(progress=progress) for run in self.runs],
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / results.RESULTS_JSON).write_text(json.dumps(record, indent=2) + "\n")
        results.render_report(self.out)
        return record


def render(payload: dict, out_dir: Path) -> str:
    """The demo's table (results.md) and ``ppl_memory.png``, from its ``results.json``."""
    runs, config = payload["results"], payload["config"]
    title = (
        f"{runs[0]['model']} on {config['data']}: {config['tokens']} tokens fed one by one, budget {config['budget']}"
    )
    plot_ppl_memory(runs, out_dir / "ppl_memory.png", title=title)
    return f"{title}\n\n```\n{results_table(runs, budget=False)}\n```\n\n![](ppl_memory.png)"


def prepare_demo(
    out: Path | str = Path("runs") / "demo",
    *,
    tokens: int = 800,
    budget: int | float = 0.2,
    model: str = "default",
    methods: Sequence[str] = DEMO_METHODS,
    data: str = "pg-essays",
    seed: int = 0,
) -> Demo:
    """Load the model and the text and validate every method (``full`` without a budget); no compute.

    Raises ``ValueError``/``TypeError``/``FileNotFoundError`` for bad arguments or missing files.
    """
    if not methods:
        raise ValueError("the demo needs at least one method")
    loaded, tokenizer = kvmerge.load_model(model)
    text = load_text(data)
    runs = [
        prepare_perplexity(
            loaded, tokenizer, text, method, None if method == "full" else budget, tokens=tokens, chunk=1, seed=seed
        )
        for method in methods
    ]
    config = {"model": model, "data": data, "tokens": tokens, "budget": budget, "chunk": 1, "seed": seed}
    return Demo(runs, config, Path(out))


def run_demo(out: Path | str = Path("runs") / "demo", *, progress: bool = True, **kwargs) -> dict:
    """:func:`prepare_demo` (same keyword arguments) then :meth:`Demo.run`: streaming perplexity of each
    method, token by token (``chunk=1``), on the first ``tokens`` tokens of ``data``."""
    return prepare_demo(out, **kwargs).run(progress=progress)
