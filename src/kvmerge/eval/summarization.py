"""XSUM and CNN/DailyMail zero-shot summarization (HELM prompts, as in H2O and CaM), scored with ROUGE.

Each prompt is generated greedily through a fresh compressed cache whose float budget is a
fraction of that prompt; generation stops at ``###`` or at the end of the first non-empty line
(HELM's stop sequence), at most ``max_new_tokens`` tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

import kvmerge
from kvmerge.compat import with_cache
from kvmerge.eval import local, results
from kvmerge.registry import options_for

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# name -> (file under the data folder, text appended to its ``article`` prompt)
DATASETS = {
    "xsum": ("xsum/xsum_0shot.jsonl", ""),  # the prompt already ends with "Summarize the above article in 1 sentence."
    "cnn_dailymail": ("cnn_dailymail/cam_cnndm_0shot.raw.jsonl", "\n\nSummarize the above article in 3 sentences.\n"),
}
STOPS = ("###", "\n")


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (Porter stemming, as in HELM) of one prediction against one reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return {name: score.fmeasure for name, score in scorer.score(reference, prediction).items()}


def cut_at_stop(text: str, stops: tuple[str, ...] = STOPS) -> str:
    """``text`` without leading whitespace, cut before the first stop string."""
    text = text.lstrip()
    for stop in stops:
        text = text.split(stop)[0]
    return text.strip()


class _StopAfterContent(StoppingCriteria):
    """Stops a row once its generated text has content followed by a stop string (leading newlines are allowed)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [len(cut_at_stop(t)) < len(t.strip()) for t in texts]
        return torch.tensor(done, device=input_ids.device)


@torch.no_grad()
def summarize(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    method: str,
    budget: float | int | None,
    seed: int = 0,
    chunk: int = 16,
    max_new_tokens: int = 64,
    options: dict | None = None,
) -> list[str]:
    """Greedy summaries of a batch of ``prompts`` (left-padded) through one fresh cache (``options``: the
    method's other :func:`kvmerge.make_cache` options)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    cache = kvmerge.make_cache(
        model, method, None if method == "full" else budget, seed=seed, chunk_size=chunk, **(options or {})
    )
    length = batch.input_ids.shape[1]
    out = model.generate(
        **batch,
        **with_cache(model, cache),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=StoppingCriteriaList([_StopAfterContent(tokenizer, length)]),
    )
    return [cut_at_stop(text) for text in tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)]


def run_summarization(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: str,
    methods: list[str],
    budgets: list[float | int],
    seeds: list[int],
    limit: int | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 4,
    chunk: int = 16,
    max_new_tokens: int = 64,
    data_dir: str | Path | None = None,
    model_name: str = "default",
    options: dict | None = None,
    progress: bool = True,
    resume: bool = False,
) -> list[dict]:
    """ROUGE of every (method, budget, seed) on the first ``limit`` prompts of ``dataset`` (see :data:`DATASETS`).

    Returns one record per run (mean ROUGE-1/2/L F-measures, seconds); ``results.json`` also keeps
    every prediction with its scores. Written to ``out_dir`` after every run; ``resume`` continues the
    runs ``out_dir`` holds (:class:`~kvmerge.eval.results.Ledger`).
    """
    file, suffix = DATASETS[dataset]
    path = local.data_dir(data_dir) / file
    docs = local.read_jsonl(path, limit)
    prompts = [doc["article"] + suffix for doc in docs]
    config = {
        "model": model_name,
        "dataset": dataset,
        "methods": methods,
        "budgets": budgets,
        "seeds": seeds,
        "limit": limit,
        "chunk": chunk,
        "max_new_tokens": max_new_tokens,
        "stops": STOPS,
        "options": options or {},
        "budget_semantics": "fraction of each prompt",
        "data_sha256": results.digest(path),
    }
    ledger = results.Ledger(out_dir, "summarization", config, resume, examples=[])
    runs = results.run_grid(methods, budgets, seeds, options)
    for method, budget, seed in tqdm(runs, desc=f"{dataset} runs", disable=not progress):
        if ledger.done(method, budget, seed):
            continue
        start = time.perf_counter()
        predictions = []
        for i in range(0, len(prompts), batch_size):
            predictions += summarize(
                model, tokenizer, prompts[i : i + batch_size], method, budget, seed, chunk, max_new_tokens,
                options_for(method, options or {}),
            )  # fmt: skip
        seconds = time.perf_counter() - start
        scores = [rouge(p, doc["summary_gt"]) for p, doc in zip(predictions, docs, strict=True)]
        run = {"dataset": dataset, "method": method, "budget": budget, "seed": seed}
        means = {name: results.mean_std(s[name] for s in scores)[0] for name in ROUGE_TYPES}
        examples = [
            {**run, "index": i, "prediction": p, **s} for i, (p, s) in enumerate(zip(predictions, scores, strict=True))
        ]
        ledger.add([{**run, **means, "n": len(docs), "seconds": seconds}], examples=examples)
    return ledger.records


def render(payload: dict, out_dir: Path) -> str:
    """ROUGE table (rows = method, budget; columns = ROUGE type, in %) and ROUGE-L against budget."""
    records = payload["records"]
    long = [{**r, "rouge": name, "value": r[name]} for r in records for name in ROUGE_TYPES]
    budgeted = [r for r in records if r["budget"] is not None]
    if budgeted:
        results.line_plot(
            budgeted, "budget", "rougeL", "method", out_dir / "rougeL.png", f"{payload['config']['dataset']} ROUGE-L"
        )
    table = results.markdown_table(long, ("dataset", "method", "budget"), "rouge", "value", scale=100, digits=2)
    return f"ROUGE F-measure (%), mean ± std over seeds.\n\n{table}\n\n![ROUGE-L](rougeL.png)"
