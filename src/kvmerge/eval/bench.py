"""Speed and memory against the full cache, every figure measured in the same run.

Each (method, context, batch) point runs in a fresh subprocess so that its peak RSS is its own:
prefill the context (the ``step`` schedule in chunks), then decode ``steps`` tokens one at a
time; report decode ms/token (median), prefill seconds, exact KV bytes held, the statistics
kept beside them and peak RSS. The full cache is run at every context *and* at every budget,
so the report can give both the throughput ratio (method at L vs full at L) and the
compression overhead (method at L vs full at its budget B).
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

import kvmerge
from kvmerge.eval.data import load_text
from kvmerge.eval.results import line_plot, markdown_table, write_results


@dataclass(frozen=True)
class Point:
    """One measurement's settings."""

    method: str
    context: int
    batch: int
    budget: int | None
    steps: int = 32
    chunk: int = 256
    model: str = "default"


def measure(point: Point) -> dict:
    """Run one point in this process; return its figures."""
    torch.manual_seed(0)
    model, tokenizer = kvmerge.load_model(point.model)
    text = load_text("pg-essays")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    repeats = math.ceil((point.context + point.batch * 997) / ids.numel())
    ids = ids.repeat(repeats)
    prompt = torch.stack([ids[b * 997 : b * 997 + point.context] for b in range(point.batch)])
    if point.method == "full":
        cache = DynamicCache(config=model.config)
    else:
        cache = kvmerge.make_cache(model, point.method, point.budget, chunk_size=point.chunk)
    with torch.inference_mode():
        started = time.perf_counter()
        logits = model(prompt, past_key_values=cache, logits_to_keep=1).logits
        prefill = time.perf_counter() - started
        rss_prefill = _rss()
        timings = []
        for _ in range(point.steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            started = time.perf_counter()
            logits = model(token, past_key_values=cache).logits
            timings.append(time.perf_counter() - started)
    kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return asdict(point) | {
        "prefill_seconds": prefill,
        "decode_ms": 1000 * statistics.median(timings),
        "kv_bytes": kv,
        "stats_bytes": cache.stats_bytes() if hasattr(cache, "stats_bytes") else 0,
        "rss_after_prefill": rss_prefill,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def measure_stream(model_name: str, tokens: int, budget: int, method: str, segment: int, chunk: int) -> list[dict]:
    """Score ``tokens`` tokens of text through one cache of ``budget`` entries; RSS and ms/token per segment."""
    model, tokenizer = kvmerge.load_model(model_name)
    ids = tokenizer(load_text("pg-essays"), return_tensors="pt").input_ids[0]
    ids = ids.repeat(math.ceil(tokens / ids.numel()))[:tokens].view(1, -1)
    cache = kvmerge.make_cache(model, method, budget, chunk_size=chunk)
    rows = []
    with torch.inference_mode():
        for start in tqdm(range(0, tokens, segment), desc=f"stream {method}", file=sys.stderr):
            began = time.perf_counter()
            model(ids[:, start : start + segment], past_key_values=cache, logits_to_keep=1)
            elapsed = time.perf_counter() - began
            rows.append(
                {
                    "method": method,
                    "tokens_seen": start + segment,
                    "ms_per_token": 1000 * elapsed / segment,
                    "rss": _rss(),
                    "kv_bytes": cache.kv_bytes(),
                }
            )
    return rows


def run_bench(
    methods: list[str],
    contexts: list[int],
    batches: list[int],
    budget: float,
    out_dir: Path,
    steps: int = 32,
    chunk: int = 256,
    model: str = "default",
    stream_tokens: int = 0,
    stream_budget: int = 1024,
) -> Path:
    """Measure every (method, context, batch) point in its own subprocess; write results, tables and plots."""
    points = []
    for context in contexts:
        kept = math.ceil(budget * context)
        for batch in batches:
            points.append(Point("full", kept, batch, None, steps, chunk, model))
            points += [
                Point(m, context, batch, None if m == "full" else kept, steps, chunk, model)
                for m in ["full", *[m for m in methods if m != "full"]]
            ]
    records = [_in_subprocess(point) for point in tqdm(points, desc="bench", file=sys.stderr)]
    stream = []
    if stream_tokens:
        for method in ("streaming", "h2o+cam"):
            stream += measure_stream(model, stream_tokens, stream_budget, method, segment=512, chunk=16)
    config = {"methods": methods, "contexts": contexts, "batches": batches, "budget": budget, "steps": steps,
              "chunk": chunk, "model": model, "stream_tokens": stream_tokens, "stream_budget": stream_budget,
              "threads": torch.get_num_threads()}  # fmt: skip
    return write_results(out_dir, "bench", config, records, stream=stream, ratios=ratios(records))


def ratios(records: list[dict]) -> list[dict]:
    """Per compressed point: decode speed-up over full at the same context, overhead over full at its budget,
    KV memory over full, CaM's extra time and memory over its selector."""
    full = {(r["context"], r["batch"]): r for r in records if r["method"] == "full"}
    by_key = {(r["method"], r["context"], r["batch"]): r for r in records}
    out = []
    for r in records:
        if r["method"] == "full":
            continue
        same, at_budget = full.get((r["context"], r["batch"])), full.get((r["budget"], r["batch"]))
        row = {"method": r["method"], "context": r["context"], "batch": r["batch"], "budget": r["budget"]}
        if same:
            row["speedup_vs_full"] = same["decode_ms"] / r["decode_ms"]
            row["kv_vs_full"] = r["kv_bytes"] / same["kv_bytes"]
            row["peak_rss_vs_full"] = r["peak_rss"] / same["peak_rss"]
        if at_budget:
            row["overhead_vs_full_at_budget"] = r["decode_ms"] / at_budget["decode_ms"]
        row["stats_vs_kv"] = r["stats_bytes"] / r["kv_bytes"]
        selector = r["method"].split("+")[0]
        if "+cam" in r["method"] and (selector, r["context"], r["batch"]) in by_key:
            base = by_key[(selector, r["context"], r["batch"])]
            row["cam_time_overhead"] = r["decode_ms"] / base["decode_ms"] - 1
            row["cam_memory_overhead"] = r["peak_rss"] / base["peak_rss"] - 1
        out.append(row)
    return out


def render(results: dict, out_dir: Path) -> str:
    """Markdown tables and PNG plots of a bench ``results.json``."""
    records = [r for r in results["records"] if r["method"] != "full" or r["context"] in results["config"]["contexts"]]
    rows = ("method", "batch")
    parts = [
        "## Decode ms/token (median)",
        markdown_table(records, rows, "context", "decode_ms", digits=1),
        "## KV MiB held",
        markdown_table(records, rows, "context", "kv_bytes", 2**-20, 2),
        "## Peak RSS MiB",
        markdown_table(records, rows, "context", "peak_rss", 2**-20, 0),
        "## Prefill seconds",
        markdown_table(records, rows, "context", "prefill_seconds", digits=2),
    ]
    ratio_rows = results.get("ratios", [])
    if ratio_rows:
        keys = [k for k in ratio_rows[0] if k not in ("method", "context", "batch", "budget")]
        keys += sorted({k for r in ratio_rows for k in r} - set(keys) - {"method", "context", "batch", "budget"})
        header = ["method", "context", "batch", *keys]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in ratio_rows:
            cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "–")) for k in header]
            lines.append("| " + " | ".join(cells) + " |")
        parts += ["## Ratios (same run)", "\n".join(lines)]
    for batch in sorted({r["batch"] for r in records}):
        chosen = [r for r in records if r["batch"] == batch]
        line_plot(chosen, "context", "decode_ms", "method", out_dir / f"decode_ms_batch{batch}.png",
                  f"decode ms/token, batch {batch}", "context (tokens)", "ms/token")  # fmt: skip
        line_plot(chosen, "context", "kv_bytes", "method", out_dir / f"kv_bytes_batch{batch}.png",
                  f"KV bytes held, batch {batch}", "context (tokens)", "bytes", logy=True)  # fmt: skip
    if results.get("stream"):
        line_plot(results["stream"], "tokens_seen", "ms_per_token", "method", out_dir / "stream_ms.png",
                  "constant-memory stream: ms/token", "tokens seen", "ms/token")  # fmt: skip
        line_plot(results["stream"], "tokens_seen", "rss", "method", out_dir / "stream_rss.png",
                  "constant-memory stream: RSS", "tokens seen", "bytes")  # fmt: skip
    return "\n\n".join(parts)


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _in_subprocess(point: Point) -> dict:
    command = [sys.executable, "-m", "kvmerge.eval.bench", json.dumps(asdict(point))]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench point {point} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(Point(**json.loads(sys.argv[1])))))
