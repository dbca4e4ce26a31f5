"""Output perturbation (CaM Figure 1d, Theorem 3.3): how far a compressed cache moves each layer's attention output.

For a text, every layer's attention output ``O`` (the ``self_attn`` module's output, after the
output projection) is captured with forward hooks, once through the full cache and once through a
compressed one (token by token, causal); the per-layer relative error is
``||O_compressed - O_full||_F / ||O_full||_F`` over all positions. Errors accumulate through the
layers (layer l sees the perturbed output of layer l-1), as in generation.

For merging methods it also says why a merge helps or hurts, per layer: the gate's pass rate
(merges per eviction), merges per step (per sequence and KV head), and the growth of the kept
values, the mean and the largest value norm of the cache at the end against the selector alone's.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import kvmerge
from kvmerge.absorbers.cam import MergeLog
from kvmerge.absorbers.less import with_kernels
from kvmerge.compat import with_cache
from kvmerge.eval import results
from kvmerge.eval.perplexity import require_step_schedule
from kvmerge.registry import options_for


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """Each decoder layer's ``self_attn`` module, in layer order."""
    modules = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no '*self_attn' modules to hook")
    return modules


@torch.no_grad()
def attention_outputs(model: PreTrainedModel, ids: torch.Tensor, cache: kvmerge.KVMergeCache) -> list[torch.Tensor]:
    """Every layer's attention output for ``ids`` ``[1, T]`` run through ``cache``; each ``[T, hidden]`` float32."""
    captured: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _in, out: captured.append(out[0][0].float().cpu()))
        for m in attention_modules(model)
    ]
    try:
        model(ids, **with_cache(model, cache), use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def value_norms(cache: kvmerge.KVMergeCache) -> list[tuple[float, float]]:
    """Per layer, the mean and the largest L2 norm of the values ``cache`` holds (valid entries only)."""
    out = []
    for layer in cache.layers:
        norms = layer.values.float().norm(dim=-1)[layer.index >= 0]
        out.append((float(norms.mean()), float(norms.max())) if norms.numel() else (0.0, 0.0))
    return out


def relative_errors(compressed: list[torch.Tensor], full: list[torch.Tensor]) -> list[float]:
    """Per layer ``||compressed - full||_F / ||full||_F``."""
    return [float((c - f).norm() / f.norm()) for c, f in zip(compressed, full, strict=True)]


def run_perturbation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    methods: list[str],
    budgets: list[float | int],
    seeds: list[int],
    tokens: int = 512,
    chunk: int = 1,
    out_dir: str | Path | None = None,
    model_name: str = "default",
    options: dict | None = None,
    progress: bool = True,
) -> list[dict]:
    """Per-layer relative attention-output error of every (method, budget, seed) against the full cache.

    Returns one record per (method, budget, seed, layer): ``rel_error``, ``value_norm_mean`` and
    ``value_norm_max`` (of the cache at the end), the run's ``seconds``, and for ``+cam`` methods
    ``pass_rate`` and ``merges_per_step`` (see :class:`~kvmerge.absorbers.cam.MergeLog`).
    """
    runs = results.run_grid([m for m in methods if m != "full"], budgets, seeds, options)
    for method, budget, seed in runs:  # validate every run before any compute
        own = with_kernels(method, budget, model.config._name_or_path, options_for(method, options or {}))
        require_step_schedule(kvmerge.make_method(method, budget, seed=seed, chunk_size=chunk, **own))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens].to(model.device)
    full = attention_outputs(model, ids, kvmerge.make_cache(model, "full"))
    records = []
    for method, budget, seed in tqdm(runs, desc="perturbation", disable=not progress):
        start = time.perf_counter()
        own = options_for(method, options or {})
        cache = kvmerge.make_cache(model, method, budget=budget, seed=seed, chunk_size=chunk, **own)
        with MergeLog() as log:
            errors = relative_errors(attention_outputs(model, ids, cache), full)
        seconds = time.perf_counter() - start
        merges = log.summary()
        for layer, (error, (norm_mean, norm_max)) in enumerate(zip(errors, value_norms(cache), strict=True)):
            record = {"method": method, "budget": budget, "seed": seed, "layer": layer, "rel_error": error}
            record |= {"value_norm_mean": norm_mean, "value_norm_max": norm_max, "seconds": seconds}
            if layer in merges:
                record |= {k: merges[layer][k] for k in ("pass_rate", "merges_per_step")}
            records.append(record)
    if out_dir is not None:
        config = {
            "model": model_name,
            "methods": methods,
            "budgets": budgets,
            "seeds": seeds,
            "tokens": int(ids.shape[1]),
            "chunk": chunk,
            "options": options or {},
            "budget_semantics": "fraction of the text",
        }
        results.write_results(out_dir, "perturbation", config, records)
    return records


def render(payload: dict, out_dir: Path) -> str:
    """Mean relative error per method and budget, and per-layer curves (one plot per budget)."""
    records = payload["records"]
    images = []
    for (budget,), rs in results.group(records, ("budget",)).items():
        name = f"perturbation_{budget}.png"
        results.line_plot(
            rs,
            "layer",
            "rel_error",
            "method",
            out_dir / name,
            f"attention output error, budget {budget}",
            ylabel="||O - O_full|| / ||O_full||",
        )
        images.append(f"![budget {budget}]({name})")
    averaged = [
        {"method": m, "budget": b, "seed": s, "value": results.mean_std(r["rel_error"] for r in rs)[0]}
        for (m, b, s), rs in results.group(records, ("method", "budget", "seed")).items()
    ]
    table = results.markdown_table(averaged, ("method",), "budget", "value", digits=4)
    text = (
        "Relative error of the attention outputs against the full cache, averaged over layers "
        f"(rows = method, columns = budget; mean ± std over seeds).\n\n{table}\n\n" + "\n".join(images)
    )
    merging = merge_diagnostics(records)
    if not merging:
        return text
    rows = []
    for (method, budget), rs in results.group(merging, ("method", "budget")).items():
        cells = [results.mean_std(r[k] for r in rs)[0] for k in ("pass_rate", "merges_per_step", "growth_mean")]
        rows.append([method, budget, *(f"{c:.3f}" for c in cells), f"{max(r['growth_max'] for r in rs):.2f}"])
    header = "| method | budget | gate pass rate | merges per step | value norm growth (mean) | largest growth |"
    lines = [header, "|---|---|---|---|---|---|", *("| " + " | ".join(map(str, row)) + " |" for row in rows)]
    plots = []
    for (budget,), rs in results.group(merging, ("budget",)).items():
        for key, label in (("pass_rate", "gate pass rate"), ("growth_max", "largest value norm / selector's")):
            name = f"merging_{key}_{budget}.png"
            results.line_plot(rs, "layer", key, "method", out_dir / name, f"{label}, budget {budget}", ylabel=label)
            plots.append(f"![{label}, budget {budget}]({name})")
    return (
        f"{text}\n\nMerging, averaged over layers and seeds: the gate's pass rate (merges per eviction), merges "
        "per step (per sequence and KV head), and the value norms of the cache at the end against the selector "
        "alone's (mean norm ratio; largest: the largest per-layer ratio of the largest norms).\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(plots)
    )


def merge_diagnostics(records: list[dict]) -> list[dict]:
    """Per (merging method, budget, seed, layer): ``pass_rate``, ``merges_per_step`` and the value-norm growth
    against the selector alone at the same budget (first seed), ``growth_mean`` and ``growth_max``."""
    alone = {(r["method"], r["budget"], r["layer"]): r for r in records if "+" not in r["method"]}
    out = []
    for r in records:
        base = alone.get((r["method"].split("+")[0], r["budget"], r["layer"]))
        if "pass_rate" not in r or base is None or "value_norm_max" not in r:
            continue
        growth_mean = r["value_norm_mean"] / base["value_norm_mean"] if base["value_norm_mean"] else float("nan")
        growth_max = r["value_norm_max"] / base["value_norm_max"] if base["value_norm_max"] else float("nan")
        out.append({**r, "growth_mean": growth_mean, "growth_max": growth_max})
    return out
