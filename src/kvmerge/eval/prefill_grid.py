"""``kvmerge bench --prefill``: time to first token and its peak memory, against the full cache.

For each prompt length, one process prefills the whole prompt in **one forward call** (what
``model.generate`` does) with transformers' ``DynamicCache`` and with each method under each schedule
it supports: ``prefill`` (attend like the full cache, compress once afterwards) and ``step``
(compress after every ``chunk_size`` tokens, the library's default). The runs are repeated
round-robin, one repeat of every run in turn, so that all see the same machine load; each repeat
records seconds and the peak RSS growth above what the process held before it (freed memory handed
back to the OS first). Ratios are medians against the full cache of the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kvmerge.compat import with_cache
from kvmerge.eval.measure import bench_cache, bench_model, bench_prompt, peak_rss, release_memory

SCHEDULES = ("prefill", "step")


def schedules_of(method: str) -> tuple[str, ...]:
    """The schedules ``method`` supports (a part with its own schedule allows only that one)."""
    from kvmerge.registry import ABSORBERS, SELECTORS

    selector, _, absorber = method.partition("+")
    only = {part.schedule for part in (SELECTORS[selector], ABSORBERS.get(absorber)) if part and part.schedule}
    return tuple(s for s in SCHEDULES if not only or s in only)


def measure_prefill(
    model_name: str,
    context: int,
    methods: list[str],
    budget: int,
    repeats: int = 5,
    chunk_size: int = 32,
    threads: int = 1,
    report: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Prefill a ``context``-token prompt with the full cache and with every method and schedule, each
    ``repeats`` times round-robin; one record per (method, schedule) with every repeat's seconds and
    peak RSS growth (bytes), their medians, and the ratio of the medians to the full cache's."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tokenizer = bench_model(model_name)
    prompt = bench_prompt(tokenizer, context, 1)
    runs = [("full", "full", None)] + [
        (method, schedule, {"schedule": schedule} | ({"chunk_size": chunk_size} if schedule == "step" else {}))
        for method in methods
        for schedule in schedules_of(method)
    ]
    seconds: list[list[float]] = [[] for _ in runs]
    growth: list[list[int]] = [[] for _ in runs]
    with torch.inference_mode():
        for method, _, options in runs:  # warm-up: first calls, lazy initialisation
            cache = bench_cache(model, method, min(budget, 16), options or {})
            model(prompt[:, :64], **with_cache(model, cache), logits_to_keep=1)
        for _ in range(repeats):
            for i, (method, _, options) in enumerate(runs):
                cache = bench_cache(model, method, budget, options or {})
                baseline = release_memory()
                started = time.perf_counter()
                model(prompt, **with_cache(model, cache), logits_to_keep=1)
                seconds[i].append(time.perf_counter() - started)
                growth[i].append(peak_rss() - baseline)
                del cache
            if report:
                report({"repeat": len(seconds[0])})
    full = statistics.median(seconds[0])
    records = []
    for (method, schedule, _), times, peaks in zip(runs, seconds, growth, strict=True):
        median = statistics.median(times)
        records.append({
            "method": method,
            "schedule": schedule,
            "context": context,
            "budget": None if method == "full" else budget,
            "chunk_size": chunk_size if schedule == "step" else None,
            "seconds": times,
            "seconds_median": median,
            "vs_full": median / full,
            "rss_growth": peaks,
            "rss_growth_median": statistics.median(peaks),
            "rss_growth_spread": max(peaks) - min(peaks),
        })  # fmt: skip
    return records


def render_prefill(records: list[dict]) -> list[str]:
    """Markdown sections of the prefill grid: seconds and ratio to the full cache, peak RSS growth."""
    mib = 2**-20
    contexts = sorted({r["context"] for r in records})
    header = "| method | schedule | " + " | ".join(f"L = {c}" for c in contexts) + " |"
    rule = "|---|---|" + "---|" * len(contexts)

    def table(cell: Callable[[dict], str]) -> str:
        lines = [header, rule]
        for method, schedule in dict.fromkeys((r["method"], r["schedule"]) for r in records):
            cells = []
            for context in contexts:
                found = [
                    r for r in records if (r["method"], r["schedule"], r["context"]) == (method, schedule, context)
                ]
                cells.append(cell(found[0]) if found else "–")
            lines.append(f"| {method} | {schedule} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    repeats = len(records[0]["seconds"])
    return [
        f"## Prefill: one forward call of the whole prompt (median of {repeats} round-robin repeats)",
        "seconds (ratio to the full cache, same run)",
        table(lambda r: f"{r['seconds_median']:.2f} ({r['vs_full']:.2f})"),
        "## Prefill peak RSS growth, MiB: median [min-max over the repeats]",
        table(
            lambda r: (
                f"{r['rss_growth_median'] * mib:.0f} [{min(r['rss_growth']) * mib:.0f}-"
                f"{max(r['rss_growth']) * mib:.0f}]"
            )
        ),
    ]


def add_prefill_arguments(
    parser: argparse.ArgumentParser, counts: Callable, count: Callable, repeats: int, chunk_size: int
) -> None:
    """The ``--prefill*`` options of ``kvmerge bench`` (``counts``/``count`` parse a comma list / one count)."""
    parser.add_argument(
        "--prefill",
        type=counts,
        default=[],
        metavar="CONTEXTS",
        help="also time the prefill of these prompt lengths (e.g. 1024,4096,8192) in one forward call, full "
        "cache against each method under the prefill and step schedules, --prefill-repeats times round-robin",
    )
    parser.add_argument(
        "--prefill-repeats", type=count, default=repeats, help=f"repeats of the prefill grid ({repeats})"
    )
    parser.add_argument(
        "--prefill-chunk",
        type=count,
        default=chunk_size,
        help=f"tokens per compression step of the prefill grid's step schedule ({chunk_size}, the library's default)",
    )
