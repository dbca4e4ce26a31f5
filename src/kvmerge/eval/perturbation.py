"""Output perturbation (CaM Figure 1d, Theorem 3.3): how far a compressed cache moves each layer's attention output.

For a text, every layer's attention output ``O`` (the ``self_attn`` module's output, after the
output projection) is captured with forward hooks, once through the full cache and once through a
compressed one (token by token, causal); the per-layer relative error is
``||O_compressed - O_full||_F / ||O_full||_F`` over all positions. Errors accumulate through the
layers (layer l sees the perturbed output of layer l-1), as in generation.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import kvmerge
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
        model(ids, past_key_values=cache, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


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
) -> list[dict]:
    """Per-layer relative attention-output error of every (method, budget, seed) against the full cache.

    Returns one record per (method, budget, seed, layer): ``rel_error``, and the run's ``seconds``.
    """
    runs = results.run_grid([m for m in methods if m != "full"], budgets, seeds)
    for method, budget, seed in runs:  # validate every run before any compute
        own = options_for(method, options or {})
        require_step_schedule(kvmerge.make_method(method, budget, seed=seed, chunk_size=chunk, **own))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens].to(model.device)
    full = attention_outputs(model, ids, kvmerge.make_cache(model, "full"))
    records = []
    for method, budget, seed in tqdm(runs, desc="perturbation"):
        start = time.perf_counter()
        own = options_for(method, options or {})
        cache = kvmerge.make_cache(model, method, budget=budget, seed=seed, chunk_size=chunk, **own)
        errors = relative_errors(attention_outputs(model, ids, cache), full)
        seconds = time.perf_counter() - start
        records += [
            {"method": method, "budget": budget, "seed": seed, "layer": layer, "rel_error": error, "seconds": seconds}
            for layer, error in enumerate(errors)
        ]
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
    return (
        "Relative error of the attention outputs against the full cache, averaged over layers "
        f"(rows = method, columns = budget; mean ± std over seeds).\n\n{table}\n\n" + "\n".join(images)
    )
