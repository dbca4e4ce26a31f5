"""``kvmerge bench --lm-eval TASK``: evaluation throughput of the kvmerge lm-eval model against lm-eval's
own ``hf`` model with a full cache, on the same requests and batch size.

Every request of a teacher-forced task (one per answer choice) is a forward pass; lm-eval's ``hf``
model runs it through transformers' ``DynamicCache``, the kvmerge model through a fresh compressed
cache in steps of ``chunk`` tokens (1: token by token, the papers' protocol). Runs are timed one
after the other in one process; ratios are seconds against the ``hf`` run of the same batch size.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from kvmerge.eval.measure import bench_model


def measure_throughput(
    model_name: str,
    task: str,
    methods: list[str],
    budget: float | int,
    limit: int | None = None,
    batch_sizes: tuple[int, ...] = (8,),
    chunk: int = 1,
    threads: int = 1,
    report=None,
) -> list[dict]:
    """Seconds, requests/s and accuracy of ``task`` (first ``limit`` documents) for lm-eval's ``hf`` model
    and for the kvmerge model with each method, at every batch size; one record per run."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from kvmerge.eval import harness

    torch.set_num_threads(threads)
    model, tokenizer = bench_model(model_name)
    manager = harness.task_manager(include_defaults=False)
    records = []
    for batch_size in batch_sizes:
        runs = [("hf", "full", lambda b=batch_size: HFLM(pretrained=model, tokenizer=tokenizer, batch_size=b))]
        runs += [
            (
                "kvmerge",
                method,
                lambda m=method, b=batch_size: harness.KVMergeLM(
                    model, tokenizer, method=m, budget=budget, chunk=chunk, batch_size=b, progress=False
                ),
            )
            for method in methods
        ]
        reference = None
        for library, method, make in runs:
            lm = make()
            started = time.perf_counter()
            with harness.quiet_git():
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], limit=limit, task_manager=manager, verbosity="ERROR", log_samples=True
                )
            seconds = time.perf_counter() - started
            model.set_attn_implementation("sdpa")  # the kvmerge model switched it; hf runs on plain SDPA
            requests = sum(len(sample["arguments"]) for sample in out["samples"][task])
            reference = seconds if library == "hf" else reference
            records.append({
                "library": library,
                "method": method,
                "task": task,
                "budget": None if method == "full" else budget,
                "chunk": chunk if library == "kvmerge" else None,
                "batch_size": batch_size,
                "documents": out["n-samples"][task]["effective"],
                "requests": requests,
                "seconds": seconds,
                "requests_per_second": requests / seconds,
                "vs_hf": seconds / reference,
                "acc": out["results"][task]["acc,none"],
            })  # fmt: skip
            if report:
                report(records[-1])
    return records


def render_throughput(records: list[dict]) -> list[str]:
    """A Markdown section: one row per run."""
    lines = [
        "| model | method | batch | chunk | documents | requests | seconds | requests/s | x hf | acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['library']} | {r['method']} | {r['batch_size']} | {r['chunk'] or '–'} | {r['documents']} | "
            f"{r['requests']} | {r['seconds']:.1f} | {r['requests_per_second']:.2f} | {r['vs_hf']:.2f} | "
            f"{r['acc']:.3f} |"
        )
    task, budget = records[0]["task"], next((r["budget"] for r in records if r["budget"] is not None), None)
    return [f"## Evaluation throughput: {task}, budget {budget} (lm-eval, one process)", "\n".join(lines)]


def check_lm_eval(task: str, methods: tuple[str, ...], budget: float | int) -> None:
    """Raise ``ValueError`` for a task that is not one of kvmerge's (local data, no download), or a method
    that cannot be scored teacher-forced."""
    import kvmerge
    from kvmerge.eval import harness
    from kvmerge.eval.perplexity import require_step_schedule

    known = harness.task_manager(include_defaults=False).all_tasks
    if task not in known:
        raise ValueError(f"--lm-eval: unknown task {task!r}; one of {', '.join(sorted(known))}")
    for method in methods:
        try:
            require_step_schedule(kvmerge.make_method(method, budget))
        except ValueError as error:
            raise ValueError(f"--lm-eval with {method}: {error}") from None


def add_lm_eval_arguments(parser: argparse.ArgumentParser, counts: Callable, count: Callable) -> None:
    """The ``--lm-eval*`` options of ``kvmerge bench`` (``counts``/``count`` parse a comma list / one count)."""
    parser.add_argument(
        "--lm-eval",
        metavar="TASK",
        help="also time one of kvmerge's teacher-forced lm-eval tasks (e.g. kvmerge_copa) through the kvmerge "
        "model with each method against lm-eval's own hf model with a full cache, same requests and batch size",
    )
    parser.add_argument("--lm-eval-limit", type=count, default=None, help="documents of --lm-eval's task (all)")
    parser.add_argument("--lm-eval-batches", type=counts, default=[8], help="comma list of --lm-eval batch sizes (8)")
    parser.add_argument(
        "--lm-eval-chunk",
        type=count,
        default=1,
        help="tokens per compression step of --lm-eval's kvmerge runs (1: token by token, the papers')",
    )
