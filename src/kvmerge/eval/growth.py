"""Value-norm growth on a long stream: do merged values stay bounded?

A merge adds to the values it keeps; a rule that adds too often makes long-lived entries grow
without bound. This benchmark streams a long text through each method's cache (steps of ``chunk``
tokens, one forward call per ``segment``) and records, every ``every`` tokens, the largest value
norm each layer holds. The figure of merit is the largest norm of any layer under ``selector+absorber``
over the same under the selector alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import kvmerge
from kvmerge.absorbers.less import with_kernels
from kvmerge.compat import with_cache
from kvmerge.eval import results
from kvmerge.eval.perplexity import token_ids
from kvmerge.eval.perturbation import value_norms
from kvmerge.registry import options_for


def run_growth(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    methods: list[str],
    budget: int,
    seeds: list[int] = (0,),
    tokens: int = 20_000,
    chunk: int = 16,
    every: int = 1_000,
    out_dir: str | Path | None = None,
    model_name: str = "default",
    options: dict | None = None,
    progress: bool = True,
) -> list[dict]:
    """Stream the first ``tokens`` tokens of ``text`` through every (method, seed) at an int ``budget``.

    Returns one record per (method, seed, checkpoint, layer): ``tokens_seen``, ``layer``,
    ``value_norm_max`` and ``value_norm_mean`` of the values held then, and the run's ``seconds``.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"growth takes an int budget (entries per head), got {budget!r}")
    runs = results.run_grid([m for m in methods if m != "full"], [budget], list(seeds), options)
    for method, _, seed in runs:  # validate every run before any compute
        own = with_kernels(method, budget, model.config._name_or_path, options_for(method, options or {}))
        kvmerge.make_method(method, budget, seed=seed, chunk_size=chunk, **own)
    ids = token_ids(tokenizer, text, tokens).to(model.device)
    records = []
    for method, _, seed in tqdm(runs, desc="growth", disable=not progress):
        own = options_for(method, options or {})
        cache = kvmerge.make_cache(model, method, budget=budget, seed=seed, chunk_size=chunk, **own)
        start = time.perf_counter()
        with torch.inference_mode():
            for stop in range(every, tokens + 1, every):
                model(ids[:, stop - every : stop], **with_cache(model, cache))
                for layer, (norm_mean, norm_max) in enumerate(value_norms(cache)):
                    records.append({
                        "method": method, "budget": budget, "seed": seed, "tokens_seen": stop, "layer": layer,
                        "value_norm_max": norm_max, "value_norm_mean": norm_mean,
                    })  # fmt: skip
        seconds = time.perf_counter() - start
        for record in records:
            if record["method"] == method and record["seed"] == seed:
                record["seconds"] = seconds
    if out_dir is not None:
        config = {
            "model": model_name,
            "methods": methods,
            "budget": budget,
            "seeds": list(seeds),
            "tokens": tokens,
            "chunk": chunk,
            "every": every,
            "options": options or {},
        }
        results.write_results(out_dir, "growth", config, records)
    return records


def growth_ratios(records: list[dict]) -> list[dict]:
    """Per (method with an absorber, seed, checkpoint): the largest value norm over all layers, the selector
    alone's (same budget, first seed) and their ratio ``growth``."""
    largest: dict[tuple, float] = {}
    for r in records:
        key = (r["method"], r["seed"], r["tokens_seen"])
        largest[key] = max(largest.get(key, 0.0), r["value_norm_max"])
    alone = {(m, t): v for (m, _, t), v in sorted(largest.items(), reverse=True) if "+" not in m}
    out = []
    for (method, seed, seen), value in largest.items():
        base = alone.get((method.split("+")[0], seen))
        if "+" in method and base:
            out.append({"method": method, "seed": seed, "tokens_seen": seen, "largest": value, "alone": base,
                        "growth": value / base})  # fmt: skip
    return out


def render(payload: dict, out_dir: Path) -> str:
    """Largest value norm against tokens seen (one line per method), and the growth table at the end."""
    records = payload["records"]
    largest = [
        {"method": m, "seed": s, "tokens_seen": t, "value_norm_max": max(r["value_norm_max"] for r in rs)}
        for (m, s, t), rs in results.group(records, ("method", "seed", "tokens_seen")).items()
    ]
    results.line_plot(
        largest, "tokens_seen", "value_norm_max", "method", out_dir / "growth.png",
        f"largest value norm of any layer, budget {payload['config']['budget']}", ylabel="max ||V||",
    )  # fmt: skip
    ratios = growth_ratios(records)
    last = max((r["tokens_seen"] for r in records), default=0)
    rows = [r for r in ratios if r["tokens_seen"] == last]
    lines = ["| method | seed | largest ||V|| | selector alone | growth |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['method']} | {r['seed']} | {r['largest']:.2f} | {r['alone']:.2f} | {r['growth']:.3f} |" for r in rows
    ]
    worst = max((r["growth"] for r in ratios), default=float("nan"))
    return (
        f"Largest value norm of any layer after {last} tokens, and against the selector alone "
        f"(largest growth at any checkpoint: {worst:.3f}).\n\n" + "\n".join(lines) + "\n\n![growth](growth.png)"
    )
