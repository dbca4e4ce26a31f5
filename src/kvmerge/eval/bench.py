"""``kvmerge bench``: speed and memory against the full cache (and kvpress), all measured in one run.

What one run measures (every figure lands in ``results.json``; ``results.md`` and PNG plots are
rendered from it):

- **Points**: for each context L and batch b, one fresh process loads the model and, for the full
  cache (``DynamicCache``) at L, the full cache at the budget B, and each method at L, prefills L
  tokens in forward calls of ``chunk`` tokens (the ``step`` schedule: a compressing cache evicts
  after every call, so it never holds more than budget + chunk entries), recording the prefill
  seconds, the peak RSS growth of the prefill (the kernel's high-water mark, reset before it) and
  the RSS the cache holds afterwards. Then it decodes ``steps`` tokens round-robin, one step of
  each point in turn, so that all of them see the same machine load. Recorded: decode ms/token
  (median), the KV bytes held (keys and values of the kept entries), the bytes allocated for
  them, the bytes of positions and statistics kept beside them. Full at L gives the decode
  speed-up; full at B the compression overhead.
- **Stream**: one cache of ``stream_budget`` entries scores a long text in segments; ms/token,
  RSS and KV bytes per segment must stay flat.
- **kvpress** (optional, when the ``kvpress`` package can be imported): the same model, text and
  kept budget through kvpress's presses and kvmerge's methods, perplexity of a continuation and
  time side by side.

Each (context, batch) group runs in its own subprocess (``isolate=True``); every ratio is taken
between points of the same group, measured side by side.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvmerge.cli import positive_int
from kvmerge.compat import with_cache
from kvmerge.eval.kvpress_compare import compare_kvpress, kvpress_version
from kvmerge.eval.measure import bench_cache, bench_model, bench_prompt, peak_rss, release_memory, rss, text_ids
from kvmerge.eval.prefill_grid import add_prefill_arguments, measure_prefill, render_prefill
from kvmerge.eval.throughput import add_lm_eval_arguments, check_lm_eval, measure_throughput, render_throughput

# Targets of issue 5 (ratios measured in one run): name -> (threshold, comparison).
OVERHEAD_LIMIT = 1.10  # decode ms/token at any stream length <= 1.10 x full at context B
CAM_TIME_LIMIT = 0.05  # CaM on top of its selector: <= 5% extra decode time
CAM_MEMORY_LIMIT = 0.01  # ... and < 1% extra memory
STATS_LIMIT = 0.05  # statistics kept beside the entries < 5% of the KV bytes
SPEEDUP_TARGET = 1.5  # decode throughput at 8k context and a 20% budget >= 1.5 x full
SPEEDUP_CONTEXT = 8192
FLAT_LIMIT = 1.10  # stream: last segment within 10% of the first full-cache segment (ms/token and RSS)


@dataclass(frozen=True)
class Point:
    """One (method, context, batch) measurement.

    ``budget`` is entries kept per KV head (``None`` for ``full``); ``for_context`` marks a full
    cache measured at the budget of that context (the reference of the overhead target).
    """

    method: str
    context: int
    batch: int
    budget: int | None = None
    steps: int = 32
    chunk: int = 256
    model: str = "default"
    threads: int = 1
    profile: bool = False
    for_context: int | None = None


@dataclass(frozen=True)
class BenchConfig:
    """Everything one ``kvmerge bench`` run measures."""

    methods: tuple[str, ...] = ("streaming", "streaming+cam", "h2o", "h2o+cam", "tova")
    contexts: tuple[int, ...] = (512, 2048, 8192)
    batches: tuple[int, ...] = (1, 8)
    budget: float | int = 0.2
    steps: int = 32
    chunk: int = 256
    model: str = "default"
    threads: int = 1
    profile: bool = False
    stream_tokens: int = 0
    stream_budget: int = 1024
    stream_chunk: int = 32
    stream_segment: int = 1024
    stream_method: str = "streaming"
    compare_kvpress: bool = False
    points_grid: bool = True  # False: only the stream and/or the kvpress comparison
    kvpress_contexts: tuple[int, ...] = (1024,)
    kvpress_tokens: int = 64
    prefill_contexts: tuple[int, ...] = ()  # the prefill grid (one call per prompt), empty: none
    prefill_repeats: int = 5
    prefill_chunk: int = 32  # compression step of the prefill grid's step schedule
    lm_eval_task: str | None = None  # evaluation throughput on this task, against lm-eval's hf model
    lm_eval_limit: int | None = None
    lm_eval_batches: tuple[int, ...] = (8,)
    lm_eval_chunk: int = 1
    mmap_threshold: int | None = None  # glibc's fixed mmap threshold in the measuring processes (bytes)
    extra: dict = field(default_factory=dict)

    def budget_for(self, context: int) -> int:
        """Entries per head kept at ``context``: a float budget is a fraction of it, an int is fixed."""
        if isinstance(self.budget, float):
            return max(1, math.ceil(self.budget * context))
        return self.budget

    def groups(self) -> list[list[Point]]:
        """The points of one batch size and context (full at L, full at B, the methods): each group is
        measured in one process, its decoding steps timed round-robin."""
        groups: dict[tuple[int, int], list[Point]] = {}
        for point in self.points():
            groups.setdefault((point.batch, point.for_context or point.context), []).append(point)
        return list(groups.values())

    def points(self) -> list[Point]:
        """Every point, grouped by batch then context: full at L, full at B, then each method at L."""
        if not self.points_grid:
            return []
        common = {"steps": self.steps, "chunk": self.chunk, "model": self.model, "threads": self.threads}
        out = []
        for batch in self.batches:
            for context in self.contexts:
                kept = self.budget_for(context)
                out.append(Point("full", context, batch, None, profile=self.profile, **common))
                out.append(Point("full", kept, batch, None, for_context=context, **common))
                for method in self.methods:
                    out.append(Point(method, context, batch, kept, profile=self.profile, **common))
        return out


# -- measurements (each runs in the process that calls it) ----------------------------------------


def method_options(method: str, chunk: int) -> dict:
    """``make_cache`` options of a benchmarked method: the ``step`` schedule in steps of ``chunk``
    tokens, or the ``prefill`` schedule for the parts that only work there (SnapKV, KVMerger)."""
    from kvmerge.registry import ABSORBERS, SELECTORS

    selector, _, absorber = method.partition("+")
    if any(part and part.schedule == "prefill" for part in (SELECTORS.get(selector), ABSORBERS.get(absorber))):
        return {"schedule": "prefill"}
    return {"chunk_size": chunk}


def kv_accounting(cache, model) -> dict:
    """Bytes of the keys and values a cache holds, against kept entries x bytes per entry.

    ``kv_bytes``: what the cache reports (``kv_bytes()``; for ``DynamicCache`` the same sum of its
    tensors). ``kept_per_head``: entries per sequence and KV head in the first layer.
    ``bytes_per_token``: one token's keys and values over every layer and KV head, from the model's
    config. ``kv_bytes_allocated``: the bytes of the storages behind the key/value tensors (room
    reserved for the next step included).
    """
    config = model.config.get_text_config(decoder=True)
    layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]
    first = layers[0]
    batch, kv_heads, kept, dim = first.keys.shape
    element = first.keys.element_size() + first.values.element_size()
    held = sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in layers
    )
    storages = {}
    for layer in layers:
        for tensor in (layer.keys, layer.values):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    reported = cache.kv_bytes() if hasattr(cache, "kv_bytes") else held
    per_token = config.num_hidden_layers * kv_heads * dim * element
    return {
        "kv_bytes": reported,
        "kv_bytes_tensors": held,
        "kv_bytes_allocated": sum(storages.values()),
        "kept_per_head": kept,
        "bytes_per_token": per_token,
        "kv_bytes_expected": batch * kept * per_token,
        "stats_bytes": cache.stats_bytes() if hasattr(cache, "stats_bytes") else 0,
    }


def measure_group(points: list[Point], report: Callable[[dict], None] | None = None) -> list[dict]:
    """Measure points that share a batch size and step count, in this process; one record each.

    Each point's cache is prefilled in turn (prefill seconds; the peak RSS above what the process held
    before, with every earlier cache alive; the RSS the cache still holds afterwards). Then decoding is
    timed round-robin, one step of each point in turn, so that every point sees the same machine load
    and the ratios between them stay meaningful on a busy machine. ``report`` is told of each point
    once its prefill is done.
    """
    first = points[0]
    torch.set_num_threads(first.threads)
    torch.manual_seed(0)
    model, tokenizer = bench_model(first.model)
    caches, tokens, records = [], [], []
    with torch.inference_mode():
        _warm_up(model, tokenizer, points)
        for point in points:
            prompt = bench_prompt(tokenizer, point.context, point.batch)
            cache = bench_cache(model, point.method, point.budget, method_options(point.method, point.chunk))
            baseline = release_memory()
            started = time.perf_counter()
            for start in range(0, point.context, point.chunk):
                step = prompt[:, start : start + point.chunk]
                logits = model(step, **with_cache(model, cache), logits_to_keep=1).logits
            prefill_seconds = time.perf_counter() - started
            peak = peak_rss()
            del prompt
            held = release_memory() - baseline
            caches.append(cache)
            tokens.append(logits[:, -1:].argmax(-1))
            records.append(asdict(point) | {
                "label": "full@budget" if point.for_context else point.method,
                "column": point.for_context or point.context,
                "prefill_seconds": prefill_seconds,
                "rss_baseline": baseline,
                "prefill_peak_rss": peak,
                "prefill_rss_growth": peak - baseline,
                "rss_held": held,
            })  # fmt: skip
            if report:
                report({"prefilled": point.method})
        timings: list[list[float]] = [[] for _ in points]
        for _ in range(first.steps):
            for i, cache in enumerate(caches):
                started = time.perf_counter()
                logits = model(tokens[i], **with_cache(model, cache)).logits
                timings[i].append(time.perf_counter() - started)
                tokens[i] = logits[:, -1:].argmax(-1)
        for point, cache, token, record, times in zip(points, caches, tokens, records, timings, strict=True):
            record |= kv_accounting(cache, model) | {
                "decode_ms": 1000 * statistics.median(times),
                "decode_ms_mean": 1000 * statistics.fmean(times),
                "decode_ms_min": 1000 * min(times),
                "tokens_per_second": point.batch / statistics.median(times),
                "group_peak_rss": peak_rss(),  # since the last prefill began, all the group's caches alive
            }
            if point.profile:
                record["profile"] = profile_decode(model, cache, token)
    return records


def _warm_up(model, tokenizer, points: list[Point]) -> None:
    """Run each kind of cache of ``points`` once on a short prompt, so that no point pays for the
    process's first calls (allocator growth, lazy initialisation)."""
    batch, chunk = points[0].batch, min(points[0].chunk, 32)
    prompt = bench_prompt(tokenizer, 2 * chunk, batch)
    for method in dict.fromkeys(point.method for point in points):
        cache = bench_cache(model, method, chunk // 2, method_options(method, chunk))
        for start in range(0, prompt.shape[1], chunk):
            logits = model(prompt[:, start : start + chunk], **with_cache(model, cache), logits_to_keep=1).logits
        for _ in range(2):
            logits = model(logits[:, -1:].argmax(-1), **with_cache(model, cache)).logits


def profile_decode(model, cache, token: torch.Tensor, steps: int = 4) -> dict:
    """Where a decoding step's time goes: torch ops by self time, and kvmerge's Python functions by
    cumulative time (ms per step)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            model(token, **with_cache(model, cache))
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    python = cProfile.Profile()
    python.enable()
    for _ in range(steps):
        model(token, **with_cache(model, cache))
    python.disable()
    functions = []
    for (filename, _line, name), row in pstats.Stats(python).stats.items():  # type: ignore[attr-defined]
        calls, cumulative = row[1], row[3]
        if "/kvmerge/" in filename or filename.endswith(("cache_utils.py", "sdpa_attention.py")):
            functions.append(
                {
                    "function": f"{Path(filename).name}:{name}",
                    "ms_per_step": 1000 * cumulative / steps,
                    "calls_per_step": calls / steps,
                }
            )
    linear = sum(row[3] for (_f, _l, name), row in pstats.Stats(python).stats.items() if "_nn.linear" in name)  # type: ignore[attr-defined]
    functions.sort(key=lambda f: -f["ms_per_step"])
    return {
        "ops": [
            {"op": e.key, "ms_per_step": e.self_cpu_time_total / 1000 / steps, "calls_per_step": e.count / steps}
            for e in ops
        ],
        "python": functions[:12],
        "linear_ms_per_step": 1000 * linear / steps,
    }


def measure_stream(
    model_name: str,
    method: str,
    tokens: int,
    budget: int,
    segment: int,
    chunk: int,
    threads: int = 1,
    report: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Score ``tokens`` tokens of text through one cache of ``budget`` entries per head, in forward
    calls of ``segment`` tokens compressed in steps of ``chunk``; one row per segment (ms/token, RSS,
    KV bytes, mean NLL of the segment's next tokens). ``report`` is called with each row."""
    torch.set_num_threads(threads)
    model, tokenizer = bench_model(model_name)
    ids = text_ids(tokenizer, tokens + 1).view(1, -1)
    cache = bench_cache(model, method, budget, method_options(method, chunk))
    rows = []
    gc.collect()
    with torch.inference_mode():
        for start in range(0, tokens, segment):
            stop = min(start + segment, tokens)
            began = time.perf_counter()
            logits = model(ids[:, start:stop], **with_cache(model, cache)).logits
            elapsed = time.perf_counter() - began
            nll = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, start + 1 : stop + 1])
            rows.append(
                {
                    "method": method,
                    "budget": budget,
                    "chunk": chunk,
                    "tokens_seen": stop,
                    "ms_per_token": 1000 * elapsed / (stop - start),
                    "rss": rss(),
                    "kv_bytes": cache.kv_bytes(),
                    "stats_bytes": cache.stats_bytes(),
                    "nll": float(nll),
                }
            )
            del logits
            if report:
                report(rows[-1])
    return rows


# -- running a benchmark ---------------------------------------------------------------------------


def run_bench(config: BenchConfig, out_dir: str | Path, *, isolate: bool = True, progress: bool = True) -> Path:
    """Measure every group of points (each in its own subprocess when ``isolate``), the stream and the
    kvpress comparison; write ``results.json``, ``results.md`` and the plots into ``out_dir``."""
    from tqdm.auto import tqdm

    from kvmerge.eval.results import write_results

    run = _in_subprocess if isolate else _in_process
    if config.mmap_threshold:
        run = functools.partial(_in_subprocess, env=_malloc_env(config.mmap_threshold))
    records = []
    with tqdm(total=len(config.points()), desc="bench", disable=not progress, file=sys.stderr) as bar:
        for group in config.groups():
            bar.set_postfix_str(f"L={group[0].context} b={group[0].batch}")
            records += run("group", [asdict(point) for point in group], lambda row: bar.update(1))
    stream = []
    if config.stream_tokens:
        args = {
            "model_name": config.model,
            "method": config.stream_method,
            "tokens": config.stream_tokens,
            "budget": config.stream_budget,
            "segment": config.stream_segment,
            "chunk": config.stream_chunk,
            "threads": config.threads,
        }
        with tqdm(
            total=config.stream_tokens,
            desc=f"stream {config.stream_method}",
            unit="tok",
            disable=not progress,
            file=sys.stderr,
        ) as stream_bar:
            stream = run("stream", args, lambda row: stream_bar.update(row["tokens_seen"] - stream_bar.n))
    prefill = []
    for context in config.prefill_contexts:
        args = {
            "model_name": config.model,
            "context": context,
            "methods": list(config.methods),
            "budget": config.budget_for(context),
            "repeats": config.prefill_repeats,
            "chunk_size": config.prefill_chunk,
            "threads": config.threads,
        }
        with tqdm(
            total=config.prefill_repeats, desc=f"prefill L={context}", disable=not progress, file=sys.stderr
        ) as prefill_bar:
            prefill += run("prefill", args, lambda row: prefill_bar.update(1))
    throughput = []
    if config.lm_eval_task:
        args = {
            "model_name": config.model,
            "task": config.lm_eval_task,
            "methods": list(config.methods),
            "budget": config.budget,
            "limit": config.lm_eval_limit,
            "batch_sizes": config.lm_eval_batches,
            "chunk": config.lm_eval_chunk,
            "threads": config.threads,
        }
        runs = len(config.lm_eval_batches) * (1 + len(config.methods))
        with tqdm(total=runs, desc=f"lm-eval {config.lm_eval_task}", disable=not progress, file=sys.stderr) as bar:
            throughput = run("throughput", args, lambda row: bar.update(1))
    kvpress_records = []
    for context in config.kvpress_contexts if config.compare_kvpress else ():
        args = {
            "model_name": config.model,
            "context": context,
            "budget": config.budget_for(context),
            "tokens": config.kvpress_tokens,
            "threads": config.threads,
        }
        if progress:
            print(f"kvpress comparison, L={context} ...", file=sys.stderr)
        kvpress_records += run("kvpress", args)
    ratio_rows = ratios(records)
    settings = asdict(config) | {"isolate": isolate, "kvpress": kvpress_version(), "cpu_count": os.cpu_count()}
    return write_results(
        out_dir,
        "bench",
        settings,
        records,
        ratios=ratio_rows,
        stream=stream,
        kvpress=kvpress_records,
        prefill=prefill,
        throughput=throughput,
        targets=targets(records, ratio_rows, stream, config.budget),
    )


_KINDS: dict[str, Callable] = {
    "group": lambda args, report: measure_group([Point(**point) for point in args], report),
    "stream": lambda args, report: measure_stream(**args, report=report),
    "kvpress": lambda args, report: compare_kvpress(**args),
    "prefill": lambda args, report: measure_prefill(**args, report=report),
    "throughput": lambda args, report: measure_throughput(**args, report=report),
}


def _in_process(kind: str, args: dict, report: Callable[[dict], None] | None = None):
    return _KINDS[kind](args, report)


def _malloc_env(threshold: int | None) -> dict[str, str]:
    """glibc's settings for a fixed mmap threshold of ``threshold`` bytes (none: its dynamic default)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(threshold), "MALLOC_TRIM_THRESHOLD_": str(threshold)} if threshold else {}


def _in_subprocess(
    kind: str, args: dict, report: Callable[[dict], None] | None = None, env: dict[str, str] | None = None
):
    """Run a measurement in a fresh ``python -m kvmerge.eval.bench`` (``env``: variables added to this
    process's): its JSON lines are progress rows, then ``{"result": ...}``."""
    command = [sys.executable, "-m", "kvmerge.eval.bench", json.dumps({"kind": kind, "args": args})]
    env = os.environ | {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"} | (env or {})
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as child:
        result = None
        for line in child.stdout:
            message = json.loads(line) if line.startswith("{") else {}
            if "row" in message and report:
                report(message["row"])
            result = message.get("result", result)
        error = child.stderr.read()
    if child.returncode != 0 or result is None:
        raise RuntimeError(f"bench {kind} {args} failed (exit {child.returncode}):\n{error[-3000:]}")
    return result


def _child(message: str) -> None:
    request = json.loads(message)

    def report(row: dict) -> None:
        print(json.dumps({"row": row}), flush=True)

    print(json.dumps({"result": _KINDS[request["kind"]](request["args"], report)}), flush=True)


# -- ratios and targets ----------------------------------------------------------------------------


def ratios(records: list[dict]) -> list[dict]:
    """Per compressed point: decode speed-up over the full cache at the same context, overhead over the
    full cache at its budget, KV and peak RSS against full, statistics against KV bytes, exact
    accounting, and for ``selector+cam`` CaM's extra decode time and memory over its selector."""
    full = {(r["context"], r["batch"]): r for r in records if r["method"] == "full" and not r.get("for_context")}
    at_budget = {(r["for_context"], r["batch"]): r for r in records if r["method"] == "full" and r.get("for_context")}
    by_key = {(r["method"], r["context"], r["batch"]): r for r in records}
    out = []
    for r in records:
        if r["method"] == "full":
            continue
        row = {"method": r["method"], "context": r["context"], "batch": r["batch"], "budget": r["budget"]}
        same, reference = full.get((r["context"], r["batch"])), at_budget.get((r["context"], r["batch"]))
        if same:
            row["speedup_vs_full"] = same["decode_ms"] / r["decode_ms"]
            row["kv_vs_full"] = r["kv_bytes"] / same["kv_bytes"]
            row["prefill_rss_vs_full"] = r["prefill_rss_growth"] / max(same["prefill_rss_growth"], 1)
        if reference:
            row["overhead_vs_full_at_budget"] = r["decode_ms"] / reference["decode_ms"]
        row["stats_vs_kv"] = r["stats_bytes"] / r["kv_bytes"]
        row["kv_exact"] = r["kv_bytes"] == r["kv_bytes_expected"]
        selector, _, absorber = r["method"].partition("+")
        base = by_key.get((selector, r["context"], r["batch"]))
        if absorber == "cam" and base:
            row["cam_time_overhead"] = r["decode_ms"] / base["decode_ms"] - 1
            held, base_held = r["kv_bytes"] + r["stats_bytes"], base["kv_bytes"] + base["stats_bytes"]
            row["cam_memory_overhead"] = held / base_held - 1
            row["cam_rss_overhead"] = r["rss_held"] / max(base["rss_held"], 1) - 1
        out.append(row)
    return out


def targets(records: list[dict], ratio_rows: list[dict], stream: list[dict], budget: float | int) -> list[dict]:
    """Issue 5's targets, each with the worst measured value and whether it is met."""
    out = []

    def add(name: str, values: list[float], limit: float, met: Callable[[float], bool], worst=max, where=""):
        if values:
            value = worst(values)
            out.append({"target": name, "value": value, "limit": limit, "met": bool(met(value)), "where": where})

    def worst_of(key: str, worst=max):
        rows = [r for r in ratio_rows if key in r]
        if not rows:
            return [], ""
        row = worst(rows, key=lambda r: r[key])
        return [row[key]], f"{row['method']} L={row['context']} b={row['batch']}"

    values, where = worst_of("overhead_vs_full_at_budget")
    add(
        "decode ms/token <= 1.10 x full at context B",
        values,
        OVERHEAD_LIMIT,
        lambda v: v <= OVERHEAD_LIMIT,
        where=where,
    )
    values, where = worst_of("cam_time_overhead")
    add("CaM extra decode time <= 5%", values, CAM_TIME_LIMIT, lambda v: v <= CAM_TIME_LIMIT, where=where)
    values, where = worst_of("cam_memory_overhead")
    add(
        "CaM extra memory (KV + statistics) < 1%", values, CAM_MEMORY_LIMIT, lambda v: v < CAM_MEMORY_LIMIT, where=where
    )
    exact = [r["kv_exact"] for r in ratio_rows]
    if exact:
        out.append(
            {
                "target": "KV bytes == kept entries x bytes per entry",
                "value": sum(exact) / len(exact),
                "limit": 1.0,
                "met": all(exact),
                "where": f"{sum(exact)} of {len(exact)} points",
            }
        )
    values, where = worst_of("stats_vs_kv")
    add("statistics < 5% of KV bytes", values, STATS_LIMIT, lambda v: v < STATS_LIMIT, where=where)
    if isinstance(budget, float) and math.isclose(budget, 0.2):
        speed = [r for r in ratio_rows if r["context"] == SPEEDUP_CONTEXT and "speedup_vs_full" in r]
        if speed:
            row = min(speed, key=lambda r: r["speedup_vs_full"])
            add(
                "decode throughput at 8k, 20% budget >= 1.5 x full",
                [row["speedup_vs_full"]],
                SPEEDUP_TARGET,
                lambda v: v >= SPEEDUP_TARGET,
                worst=min,
                where=f"{row['method']} b={row['batch']} (slowest)",
            )
    flat = stream_flatness(stream)
    if flat:
        add(
            "stream ms/token flat (last / first segment <= 1.10)",
            [flat["ms_ratio"]],
            FLAT_LIMIT,
            lambda v: v <= FLAT_LIMIT,
            where=f"{flat['first']} -> {flat['last']} tokens",
        )
        add(
            "stream RSS flat (last / first segment <= 1.10)",
            [flat["rss_ratio"]],
            FLAT_LIMIT,
            lambda v: v <= FLAT_LIMIT,
            where=f"{flat['first']} -> {flat['last']} tokens",
        )
    return out


def stream_flatness(stream: list[dict]) -> dict | None:
    """ms/token and RSS of the last segment over the first segment in which the cache is full."""
    if not stream:
        return None
    budget_bytes = max(r["kv_bytes"] for r in stream)
    # the first segment that starts with a full cache (the cache fills during the segments before it)
    full = [r for previous, r in itertools.pairwise(stream) if previous["kv_bytes"] >= budget_bytes] or stream
    first, last = full[0], stream[-1]
    return {
        "first": first["tokens_seen"],
        "last": last["tokens_seen"],
        "ms_ratio": last["ms_per_token"] / first["ms_per_token"],
        "rss_ratio": last["rss"] / first["rss"],
    }


# -- report ----------------------------------------------------------------------------------------


def render(results: dict, out_dir: Path) -> str:
    """Markdown tables and PNG plots of a bench ``results.json`` (called by ``kvmerge report``)."""
    from kvmerge.eval.results import line_plot, markdown_table

    records, config = results["records"], results["config"]
    rows = ("label", "batch")
    mib = 2**-20
    parts = [
        f"Shared {config.get('cpu_count', '?')}-core CPU, {config['threads']} thread(s); budget "
        f"{config['budget']} of each context (`full@budget`: the full cache at that many tokens); "
        f"decode = median of {config['steps']} steps; prefill in forward calls of {config['chunk']} tokens.",
    ]
    parts += (
        []
        if not records
        else [
            "## Decode ms/token (median)",
            markdown_table(records, rows, "column", "decode_ms", digits=1),
            "## KV MiB held (keys + values of the kept entries)",
            markdown_table(records, rows, "column", "kv_bytes", mib, 2),
            "## Statistics and positions, % of the KV bytes",
            markdown_table(
                [r | {"stats_pct": 100 * r["stats_bytes"] / r["kv_bytes"]} for r in records],
                rows,
                "column",
                "stats_pct",
                digits=2,
            ),
            "## Prefill seconds",
            markdown_table(records, rows, "column", "prefill_seconds", digits=2),
            "## Prefill peak RSS growth, MiB (above the process before this point's prefill)",
            markdown_table(records, rows, "column", "prefill_rss_growth", mib, 1),
            "## RSS held after prefill, MiB (what the cache keeps, as the OS counts it)",
            markdown_table(records, rows, "column", "rss_held", mib, 1),
        ]
    )
    ratio_rows = results.get("ratios", [])
    if ratio_rows:
        keys = [
            "speedup_vs_full",
            "overhead_vs_full_at_budget",
            "kv_vs_full",
            "prefill_rss_vs_full",
            "stats_vs_kv",
            "kv_exact",
            "cam_time_overhead",
            "cam_memory_overhead",
            "cam_rss_overhead",
        ]
        parts += ["## Ratios (same run)", _table(ratio_rows, ["method", "context", "batch", "budget", *keys])]
    if results.get("targets"):
        parts += ["## Targets", _table(results["targets"], ["target", "value", "limit", "met", "where"])]
    stream = results.get("stream") or []
    if stream:
        flat = stream_flatness(stream)
        step = max(1, len(stream) // 12)
        shown = stream[::step] + ([stream[-1]] if (len(stream) - 1) % step else [])
        view = [r | {"rss_mib": r["rss"] * mib, "kv_mib": r["kv_bytes"] * mib} for r in shown]
        parts += [
            f"## Stream: {stream[0]['method']}, budget {stream[0]['budget']}, chunk {stream[0]['chunk']}",
            _table(view, ["tokens_seen", "ms_per_token", "rss_mib", "kv_mib", "nll"]),
            f"last / first full-cache segment: ms/token x{flat['ms_ratio']:.3f}, RSS x{flat['rss_ratio']:.3f}",
        ]
        line_plot(
            stream,
            "tokens_seen",
            "ms_per_token",
            "method",
            out_dir / "stream_ms.png",
            "constant-memory stream: ms/token",
            "tokens seen",
            "ms/token",
        )
        line_plot(
            [r | {"rss_mib": r["rss"] * mib} for r in stream],
            "tokens_seen",
            "rss_mib",
            "method",
            out_dir / "stream_rss.png",
            "constant-memory stream: RSS",
            "tokens seen",
            "MiB",
        )
    if results.get("prefill"):
        parts += render_prefill(results["prefill"])
    if results.get("throughput"):
        parts += render_throughput(results["throughput"])
    if results.get("kvpress"):
        parts += [
            "## kvpress vs kvmerge (same model, text, kept budget)",
            _table(
                results["kvpress"],
                [
                    "press",
                    "library",
                    "context",
                    "budget",
                    "kept_per_head",
                    "ppl",
                    "prefill_seconds",
                    "decode_ms",
                    "kv_bytes",
                ],
            ),
        ]
    for record in records:
        if record.get("profile"):
            profile = record["profile"]
            parts += [
                f"## Profile: {record['label']} L={record['context']} b={record['batch']} "
                f"(ms per decoding step; linear layers {profile['linear_ms_per_step']:.1f} ms)",
                _table(profile["ops"], ["op", "ms_per_step", "calls_per_step"]),
                _table(profile["python"], ["function", "ms_per_step", "calls_per_step"]),
            ]
    for batch in sorted({r["batch"] for r in records}):
        chosen = [r for r in records if r["batch"] == batch]
        line_plot(
            chosen,
            "column",
            "decode_ms",
            "label",
            out_dir / f"decode_ms_batch{batch}.png",
            f"decode ms/token, batch {batch}",
            "context (tokens)",
            "ms/token",
        )
        line_plot(
            chosen,
            "column",
            "kv_bytes",
            "label",
            out_dir / f"kv_bytes_batch{batch}.png",
            f"KV bytes held, batch {batch}",
            "context (tokens)",
            "bytes",
            logy=True,
        )
        line_plot(
            [r | {"growth": r["prefill_rss_growth"] * mib} for r in chosen],
            "column",
            "growth",
            "label",
            out_dir / f"prefill_rss_batch{batch}.png",
            f"prefill peak RSS above the model, batch {batch}",
            "prompt (tokens)",
            "MiB",
        )
    return "\n\n".join(parts)


def _table(rows: list[dict], keys: list[str]) -> str:
    keys = [k for k in keys if any(k in r for r in rows)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [_cell(r.get(k)) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


# -- memory ----------------------------------------------------------------------------------------


# -- command line ----------------------------------------------------------------------------------

EXAMPLES = """
examples:
  kvmerge bench                                   # the default grid (5 methods, 512-8192 tokens, batch 1 and 8)
  kvmerge bench --contexts 512,2048 --batches 1 --methods streaming,streaming+cam --steps 16
  kvmerge bench --contexts 8192 --batches 1 --budget 0.2 --profile --out runs/bench-8k
  kvmerge bench --no-points --stream-tokens 100000 --stream-budget 1024 --out runs/stream
  PYTHONPATH=DIR kvmerge bench --no-points --compare-kvpress --kvpress-context 1024,4096,8192

what is measured (ratios are taken between points measured side by side):
  for each context L and batch, one fresh process prefills, one point after the other, the full
  cache (transformers' DynamicCache) at L, the full cache at the budget B and each method at L,
  in forward calls of --chunk tokens (prefill time, peak RSS growth, RSS held afterwards); then
  it decodes --steps tokens round-robin, one step of each point in turn, so that all of them see
  the same machine load: decode ms/token (median), KV bytes held (exact) and statistics bytes.
  --stream-tokens N scores N tokens of text through one cache of --stream-budget entries and
  records ms/token, RSS and KV bytes per --stream-segment tokens (they must stay flat).
  --compare-kvpress runs kvpress's StreamingLLM, TOVA, SnapKV and CaM presses next to kvmerge's
  (same model, text and kept budget): perplexity of a continuation and time. It needs kvpress
  importable; kvpress 0.5 pins transformers<5.3, so install it apart:
  pip install --no-deps --target DIR kvpress cachetools fire termcolor peft, then PYTHONPATH=DIR.

writes into --out: results.json (every number), results.md (the tables printed here),
decode_ms_batch*.png, kv_bytes_batch*.png, prefill_rss_batch*.png, stream_ms.png, stream_rss.png.
Timings depend on the machine and its load: compare ratios within one run.
"""


def add_bench_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``bench`` to a CLI's subparsers; its ``func(args) -> int`` default runs it."""
    summary = "speed and memory of each method against the full cache (and kvpress), in one run"
    parser = subparsers.add_parser(
        "bench",
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = BenchConfig()
    parser.add_argument(
        "--methods",
        type=_method_list,
        default=list(defaults.methods),
        help=f"comma list of compressing methods, full always runs ({','.join(defaults.methods)})",
    )
    parser.add_argument(
        "--contexts",
        type=_count_list,
        default=list(defaults.contexts),
        help="comma list of prompt lengths in tokens (512,2048,8192)",
    )
    parser.add_argument(
        "--batches", type=_count_list, default=list(defaults.batches), help="comma list of batch sizes (1,8)"
    )
    parser.add_argument(
        "--budget",
        type=_budget,
        default=defaults.budget,
        help="entries kept per KV head: a fraction of each context (0.2 or 20%%) or a count (256)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=defaults.steps, help="decoding steps timed per point (32)"
    )
    parser.add_argument(
        "--chunk",
        type=positive_int,
        default=defaults.chunk,
        help="prompt tokens per forward call and per compression step (256)",
    )
    parser.add_argument("--model", default=defaults.model, help="'default' (SmolLM2-135M-Instruct), a path or a hub id")
    parser.add_argument("--threads", type=positive_int, default=defaults.threads, help="torch threads per process (1)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the decoding step of each point at L (torch ops and kvmerge functions)",
    )
    parser.add_argument(
        "--stream-tokens",
        type=_count_or_zero,
        default=0,
        help="tokens of the constant-memory stream (0 = no stream; e.g. 100000)",
    )
    parser.add_argument(
        "--stream-budget",
        type=positive_int,
        default=defaults.stream_budget,
        help="entries per KV head kept by the stream (1024)",
    )
    parser.add_argument(
        "--stream-chunk",
        type=positive_int,
        default=defaults.stream_chunk,
        help="tokens per compression step of the stream (32)",
    )
    parser.add_argument(
        "--stream-segment",
        type=positive_int,
        default=defaults.stream_segment,
        help="tokens per forward call of the stream, one measurement each (1024)",
    )
    parser.add_argument(
        "--stream-method", type=_method_list, default=[defaults.stream_method], help="the stream's method (streaming)"
    )
    parser.add_argument(
        "--compare-kvpress",
        action="store_true",
        help="also run kvpress's shared presses (needs the kvpress package; see below)",
    )
    parser.add_argument(
        "--kvpress-context",
        type=_count_list,
        default=list(defaults.kvpress_contexts),
        help="comma list of prompt lengths of the kvpress comparison (1024)",
    )
    parser.add_argument(
        "--kvpress-tokens",
        type=positive_int,
        default=defaults.kvpress_tokens,
        help="continuation tokens scored in the kvpress comparison (64)",
    )
    add_prefill_arguments(parser, _count_list, positive_int, defaults.prefill_repeats, defaults.prefill_chunk)
    add_lm_eval_arguments(parser, _count_list, positive_int)
    parser.add_argument(
        "--mmap-threshold",
        type=positive_int,
        metavar="BYTES",
        help="glibc's mmap threshold, fixed, in the measuring processes (MALLOC_MMAP_THRESHOLD_ and "
        "MALLOC_TRIM_THRESHOLD_): freed blocks of at least BYTES go back to the OS at once, so peak RSS no "
        "longer depends on what the allocator kept from earlier runs (e.g. 4194304; costs prefill time)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure every point in this process (faster start; peak RSS is then not per point)",
    )
    parser.add_argument(
        "--no-points", action="store_true", help="skip the grid: run only the stream and/or the kvpress comparison"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, default=Path("runs") / "bench", help="results folder (runs/bench)")
    parser.add_argument("--force", action="store_true", help="overwrite the results already in --out")
    parser.set_defaults(func=lambda args: _run_command(args, parser))
    return parser


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    """A validated :class:`BenchConfig` from parsed arguments; a clear ``parser.error`` for bad input."""
    import kvmerge
    from kvmerge.registry import SELECTORS

    methods = tuple(dict.fromkeys(m for m in args.methods if m != "full"))
    if not methods:
        parser.error("--methods: give at least one compressing method (full is always measured)")
    if len(args.stream_method) != 1:
        parser.error("--stream-method takes one method")
    for method in methods + tuple(args.stream_method):
        if method.endswith("+less"):
            parser.error(f"--methods: {method} needs trained kernels (kvmerge train-less); not benchmarked here")
        if not SELECTORS[method.split("+")[0]].compresses:
            parser.error(f"{method} does not compress (full is always measured)")
    config = BenchConfig(
        methods=methods,
        contexts=tuple(args.contexts),
        batches=tuple(args.batches),
        budget=args.budget,
        steps=args.steps,
        chunk=args.chunk,
        model=_check_model(args.model, parser),
        threads=args.threads,
        profile=args.profile,
        stream_tokens=args.stream_tokens,
        stream_budget=args.stream_budget,
        stream_chunk=args.stream_chunk,
        stream_segment=args.stream_segment,
        stream_method=args.stream_method[0],
        compare_kvpress=args.compare_kvpress,
        kvpress_contexts=tuple(args.kvpress_context),
        kvpress_tokens=args.kvpress_tokens,
        points_grid=not args.no_points,
        prefill_contexts=tuple(args.prefill),
        prefill_repeats=args.prefill_repeats,
        prefill_chunk=args.prefill_chunk,
        lm_eval_task=args.lm_eval,
        lm_eval_limit=args.lm_eval_limit,
        lm_eval_batches=tuple(args.lm_eval_batches),
        lm_eval_chunk=args.lm_eval_chunk,
        mmap_threshold=args.mmap_threshold,
    )
    if config.mmap_threshold and args.in_process:
        parser.error(
            "--mmap-threshold applies to the measuring subprocesses (glibc reads it at start): drop --in-process"
        )
    if args.no_points and not (
        config.stream_tokens or config.compare_kvpress or config.prefill_contexts or config.lm_eval_task
    ):
        parser.error(
            "--no-points leaves nothing to run: add --stream-tokens N, --prefill CONTEXTS, --lm-eval TASK "
            "and/or --compare-kvpress"
        )
    if config.lm_eval_task:
        try:
            check_lm_eval(config.lm_eval_task, config.methods, config.budget)
        except ValueError as error:
            parser.error(str(error))
    for context in (config.contexts if config.points_grid else ()) + config.prefill_contexts:
        kept = config.budget_for(context)
        if kept >= context:
            parser.error(
                f"--budget {config.budget} keeps {kept} entries of a {context}-token context: nothing "
                "to compress; use a smaller budget or longer --contexts"
            )
        for method in methods:
            try:
                kvmerge.make_method(method, kept, **method_options(method, config.chunk))
            except (ValueError, TypeError) as error:
                parser.error(f"{method} at budget {kept} (context {context}): {error}")
    if config.stream_tokens:
        if config.stream_budget >= config.stream_tokens:
            parser.error(f"--stream-budget {config.stream_budget} must be below --stream-tokens {config.stream_tokens}")
        try:
            kvmerge.make_method(
                config.stream_method, config.stream_budget, **method_options(config.stream_method, config.stream_chunk)
            )
        except (ValueError, TypeError) as error:
            parser.error(f"--stream-method {config.stream_method}: {error}")
    if config.compare_kvpress:
        if kvpress_version() is None:
            parser.error(
                "--compare-kvpress needs the kvpress package, which cannot be imported here. kvpress 0.5 pins "
                "transformers<5.3 (kvmerge uses transformers 5.x >= 5.23), so install it apart: pip install "
                "--no-deps --target DIR kvpress cachetools fire termcolor peft, then run with PYTHONPATH=DIR"
            )
        if any(config.budget_for(context) >= context for context in config.kvpress_contexts):
            parser.error("--budget keeps a whole --kvpress-context: nothing to compare")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    return config


def _run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kvmerge.eval.results import claim_out_dir

    config = config_from_args(args, parser)
    try:
        claim_out_dir(args.out, args.force)
    except FileExistsError as error:
        parser.error(str(error))
    torch.set_num_threads(config.threads)
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"  # for the child processes that measure each point
    started = time.perf_counter()
    path = run_bench(config, args.out, isolate=not args.in_process, progress=not args.no_progress)
    print((path.parent / "results.md").read_text())
    print(f"{time.perf_counter() - started:.0f} s; written: {path.parent}/results.json, results.md and plots")
    return 0


def _count_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def _count_list(text: str) -> list[int]:
    values = [positive_int(t.strip()) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return values


def _budget(text: str) -> float | int:
    value = text.strip()
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else (int(value) if value.isdigit() else float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid budget {text!r}: a fraction (0.2 or 20%) or a count (256)") from None
    if isinstance(number, float) and not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"invalid budget {text!r}: a fraction must be in (0, 1)")
    if isinstance(number, int) and number < 1:
        raise argparse.ArgumentTypeError(f"invalid budget {text!r}: a count must be >= 1")
    return number


def _method_list(text: str) -> list[str]:
    import kvmerge

    methods = [m.strip().lower() for m in text.split(",") if m.strip()]
    known = set(kvmerge.method_names())
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; see 'kvmerge methods'")
    return methods


def _check_model(name: str, parser: argparse.ArgumentParser) -> str:
    if name == "default" or (name.count("/") == 1 and not name.startswith((".", "/", "~"))):
        return name  # the default model or a hub id
    path = Path(name).expanduser()
    if not path.exists():
        parser.error(f"--model {name!r}: no such path (give 'default', a local path or a hub id owner/name)")
    return str(path)


if __name__ == "__main__":
    _child(sys.argv[1])


__all__ = [
    "BenchConfig",
    "Point",
    "add_bench_command",
    "compare_kvpress",
    "kv_accounting",
    "measure_group",
    "measure_stream",
    "ratios",
    "render",
    "run_bench",
    "targets",
]
