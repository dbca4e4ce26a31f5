"""``kvmerge bench``: end to end on a tiny random model, exact KV accounting, ratios and targets on
hand-made records, input validation, and (when kvpress is importable) the side-by-side comparison.
No assertion here depends on timings."""

from __future__ import annotations

import argparse
import json
import math
import time

import pytest
import torch

import kvmerge
from kvmerge.eval import bench, results
from tests.conftest import VOCAB, tiny_model
from tests.test_eval_suite import DATA

# the tiny Llama of tests.test_eval: 2 layers, 2 KV heads of dimension 64 / 4 = 16, float32
TINY_BYTES_PER_TOKEN = 2 * 2 * 16 * (4 + 4)
PNG = b"\x89PNG\r\n\x1a\n"


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="kvmerge")
    bench.add_bench_command(root.add_subparsers(dest="command", required=True))
    return root


def run_cli(argv: list[str]) -> int:
    args = parser().parse_args(["bench", *argv])
    return args.func(args)


def test_bench_end_to_end_on_a_tiny_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--model", str(tiny_dir), "--methods", "streaming,h2o,h2o+cam", "--contexts", "48,96",
            "--batches", "1,2", "--budget", "0.25", "--steps", "3", "--chunk", "16", "--stream-tokens", "200",
            "--stream-budget", "24", "--stream-segment", "40", "--stream-chunk", "8", "--in-process",
            "--no-progress", "--out", str(out)]  # fmt: skip
    started = time.perf_counter()
    assert run_cli(argv) == 0
    elapsed = time.perf_counter() - started
    printed = capsys.readouterr().out
    assert "## Decode ms/token (median)" in printed and "## Targets" in printed

    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmark"] == "bench" and saved["config"]["budget"] == 0.25
    records = saved["records"]
    # per batch and context: full at L, full at the budget, then each method
    assert len(records) == 2 * 2 * (2 + 3)
    for record in records:
        assert record["bytes_per_token"] == TINY_BYTES_PER_TOKEN
        expected_kept = record["context"] + record["steps"] if record["method"] == "full" else record["budget"]
        assert record["kept_per_head"] == expected_kept, record
        # exact accounting: what the cache reports == kept entries x bytes per entry, from the model's shape
        assert record["kv_bytes"] == record["batch"] * expected_kept * TINY_BYTES_PER_TOKEN, record
        assert record["kv_bytes"] == record["kv_bytes_expected"] == record["kv_bytes_tensors"]
        # storage: exactly what is held, plus one entry of room after decoding for a compressing cache
        room = record["method"] != "full" and record["label"] != "full@budget"
        assert record["kv_bytes_allocated"] == record["batch"] * (expected_kept + room) * TINY_BYTES_PER_TOKEN
    # the timings are seconds and milliseconds of this run: they add up to no more than it took
    # (at least half of a point's steps take its median or longer)
    timed = sum(r["prefill_seconds"] + 0.5 * r["steps"] * r["decode_ms"] / 1000 for r in records)
    assert 0 < timed < elapsed
    budgets = {r["context"]: r["budget"] for r in records if r["method"] != "full"}
    assert budgets == {48: 12, 96: 24}
    at_budget = [r for r in records if r["label"] == "full@budget"]
    assert sorted((r["context"], r["for_context"]) for r in at_budget) == [(12, 48), (12, 48), (24, 96), (24, 96)]
    # statistics: streaming keeps positions only (int64 per entry and head); h2o adds a float32 per entry and head
    tiny = {r["method"]: r for r in records if r["context"] == 96 and r["batch"] == 1}
    assert tiny["streaming"]["stats_bytes"] == 2 * 2 * 24 * 8
    assert tiny["h2o"]["stats_bytes"] == tiny["h2o+cam"]["stats_bytes"] == 2 * 2 * 24 * (8 + 4)

    assert len(saved["ratios"]) == 2 * 2 * 3 and all(r["kv_exact"] for r in saved["ratios"])
    cam = [r for r in saved["ratios"] if r["method"] == "h2o+cam"]
    assert all(r["cam_memory_overhead"] == 0.0 for r in cam)  # CaM reads H2O's statistic: nothing more is kept
    names = [t["target"] for t in saved["targets"]]
    assert "KV bytes == kept entries x bytes per entry" in names and "CaM extra decode time <= 5%" in names

    stream = saved["stream"]
    assert [r["tokens_seen"] for r in stream] == [40, 80, 120, 160, 200]
    assert {r["kv_bytes"] for r in stream[1:]} == {24 * TINY_BYTES_PER_TOKEN}  # full from the first segment on
    assert all(math.isfinite(r["nll"]) for r in stream)

    assert [r["label"] for r in records[:5]] == ["full", "full@budget", "streaming", "h2o", "h2o+cam"]
    for name in ["decode_ms_batch1", "decode_ms_batch2", "kv_bytes_batch1", "prefill_rss_batch2", "stream_ms",
                 "stream_rss"]:  # fmt: skip
        assert (out / f"{name}.png").read_bytes()[:8] == PNG
    # `kvmerge report` re-renders the same Markdown from results.json alone
    before = (out / "results.md").read_text()
    assert results.render_report(out).read_text() == before


def test_stream_alone(tiny_dir, tmp_path):
    argv = ["--model", str(tiny_dir), "--no-points", "--stream-tokens", "90", "--stream-budget", "16",
            "--stream-segment", "30", "--stream-chunk", "4", "--in-process", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    assert run_cli(argv) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["records"] == [] and [r["tokens_seen"] for r in saved["stream"]] == [30, 60, 90]
    assert [t["target"] for t in saved["targets"]] == [
        "stream ms/token flat (last / first segment <= 1.10)",
        "stream RSS flat (last / first segment <= 1.10)",
    ]


def test_prefill_grid(tiny_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_dir), "--no-points", "--methods", "streaming,h2o+cam,snapkv", "--prefill", "40,80",
            "--prefill-repeats", "3", "--prefill-chunk", "8", "--budget", "0.25", "--in-process", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    started = time.perf_counter()
    assert run_cli(argv) == 0
    elapsed = time.perf_counter() - started
    assert (
        "## Prefill: one forward call of the whole prompt (median of 3 round-robin repeats)" in capsys.readouterr().out
    )
    prefill = json.loads((tmp_path / "results.json").read_text())["prefill"]
    # per context: the full cache, streaming and h2o+cam under both schedules, snapkv under its own only
    runs = [(r["method"], r["schedule"]) for r in prefill if r["context"] == 40]
    assert runs == [("full", "full"), ("streaming", "prefill"), ("streaming", "step"), ("h2o+cam", "prefill"),
                    ("h2o+cam", "step"), ("snapkv", "prefill")]  # fmt: skip
    assert [r["context"] for r in prefill] == [40] * 6 + [80] * 6
    for record in prefill:
        assert len(record["seconds"]) == len(record["rss_growth"]) == 3
        assert record["seconds_median"] == sorted(record["seconds"])[1]
        assert record["budget"] == (None if record["method"] == "full" else record["context"] // 4)
        assert record["chunk_size"] == (8 if record["schedule"] == "step" else None)
        full = next(r for r in prefill if r["method"] == "full" and r["context"] == record["context"])
        assert record["vs_full"] == pytest.approx(record["seconds_median"] / full["seconds_median"])
    assert 0 < sum(sum(r["seconds"]) for r in prefill) < elapsed


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no evaluation data at {DATA}")
def test_lm_eval_throughput(tiny_dir, tmp_path, capsys):
    # a budget no sequence reaches: the kvmerge model must score every request as lm-eval's hf model does
    argv = ["--model", str(tiny_dir), "--no-points", "--methods", "h2o,streaming+cam", "--budget", "4096",
            "--lm-eval", "kvmerge_copa", "--lm-eval-limit", "4", "--lm-eval-batches", "1,3", "--in-process",
            "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert run_cli(argv) == 0
    assert "## Evaluation throughput: kvmerge_copa, budget 4096" in capsys.readouterr().out
    records = json.loads((tmp_path / "results.json").read_text())["throughput"]
    assert [(r["library"], r["method"], r["batch_size"]) for r in records] == [
        (library, method, batch)
        for batch in (1, 3)
        for library, method in [("hf", "full"), ("kvmerge", "h2o"), ("kvmerge", "streaming+cam")]
    ]
    for record in records:
        assert record["documents"] == 4 and record["requests"] == 8  # COPA: two choices per document
        assert record["requests_per_second"] == pytest.approx(8 / record["seconds"])
        assert record["acc"] == records[0]["acc"]
        hf = next(r for r in records if r["library"] == "hf" and r["batch_size"] == record["batch_size"])
        assert record["vs_hf"] == pytest.approx(record["seconds"] / hf["seconds"])


def test_lm_eval_throughput_refuses_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(["--no-points", "--lm-eval", "kvmerge_nonsense", "--out", str(tmp_path / "a")])
    assert "unknown task 'kvmerge_nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(["--no-points", "--methods", "snapkv", "--lm-eval", "kvmerge_copa", "--out", str(tmp_path / "b")])
    assert "--lm-eval with snapkv" in capsys.readouterr().err


def test_mmap_threshold_reaches_the_measuring_process(tiny_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run_cli(["--mmap-threshold", "4194304", "--in-process", "--out", str(tmp_path / "a")])
    assert "drop --in-process" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(bench, "_in_subprocess", lambda kind, args, report=None, env=None: seen.append(env) or [])
    argv = ["--model", str(tiny_dir), "--no-points", "--prefill", "40", "--methods", "streaming",
            "--mmap-threshold", "4194304", "--no-progress", "--out", str(tmp_path / "b")]  # fmt: skip
    assert run_cli(argv) == 0  # the stub measured nothing
    assert seen == [{"MALLOC_MMAP_THRESHOLD_": "4194304", "MALLOC_TRIM_THRESHOLD_": "4194304"}]


def test_one_group_in_its_own_process(tiny_dir):
    config = bench.BenchConfig(methods=("h2o+cam",), contexts=(40,), batches=(2,), budget=10, steps=2, chunk=8,
                               model=str(tiny_dir))  # fmt: skip
    (group,) = config.groups()
    reported = []
    records = bench._in_subprocess("group", [bench.asdict(p) for p in group], reported.append)
    assert len(reported) == 3 and [r["label"] for r in records] == ["full", "full@budget", "h2o+cam"]
    record = records[-1]
    assert record["kept_per_head"] == 10 and record["kv_bytes"] == 2 * 10 * TINY_BYTES_PER_TOKEN
    assert record["rss_baseline"] > 0 and record["group_peak_rss"] >= record["rss_baseline"]


@pytest.mark.parametrize(("method", "batch"), [("streaming", 1), ("h2o+cam", 3), ("tova", 2), ("scissorhands", 1)])
def test_kv_accounting_is_kept_entries_times_bytes_per_entry(method, batch):
    model = tiny_model("llama")  # 2 layers, 2 KV heads of dimension 16
    ids = torch.randint(0, VOCAB, (batch, 50), generator=torch.Generator().manual_seed(0))
    cache = kvmerge.make_cache(model, method, 12, chunk_size=5)
    with torch.no_grad():
        model(ids, **kvmerge.with_cache(model, cache))
        model(ids[:, :1], **kvmerge.with_cache(model, cache))
    accounting = bench.kv_accounting(cache, model)
    assert accounting["kept_per_head"] == 12
    assert accounting["kv_bytes"] == cache.kv_bytes() == batch * 12 * 2 * 2 * 16 * 8
    assert accounting["kv_bytes_expected"] == accounting["kv_bytes"]
    assert accounting["kv_bytes_allocated"] == batch * (12 + 1) * 2 * 2 * 16 * 8  # room for the next token
    assert cache.kv_bytes_full() == batch * 51 * 2 * 2 * 16 * 8


def hand_made_records() -> list[dict]:
    """Full at 1000 and 8192 tokens, full at their budgets, streaming and streaming+cam; round numbers."""

    def record(method, context, decode_ms, kv_bytes, stats=0, for_context=None, budget=None, rss=1000):
        return {"method": method, "context": context, "batch": 1, "budget": budget, "for_context": for_context,
                "decode_ms": decode_ms, "kv_bytes": kv_bytes, "kv_bytes_expected": kv_bytes, "stats_bytes": stats,
                "prefill_rss_growth": rss, "rss_held": kv_bytes + stats}  # fmt: skip

    return [
        record("full", 1000, 100.0, 1000 * 512, rss=600),
        record("full", 200, 50.0, 200 * 512, for_context=1000),
        record("streaming", 1000, 55.0, 200 * 512, stats=200 * 8, budget=200, rss=150),
        record("streaming+cam", 1000, 57.2, 200 * 512, stats=200 * 12, budget=200, rss=150),
        record("full", 8192, 90.0, 8192 * 512),
        record("full", 1639, 40.0, 1639 * 512, for_context=8192),
        record("streaming", 8192, 45.0, 1639 * 512, stats=1639 * 8, budget=1639),
    ]


def test_ratios_on_hand_made_records():
    rows = {(r["method"], r["context"]): r for r in bench.ratios(hand_made_records())}
    assert set(rows) == {("streaming", 1000), ("streaming+cam", 1000), ("streaming", 8192)}
    streaming, cam = rows["streaming", 1000], rows["streaming+cam", 1000]
    assert streaming["speedup_vs_full"] == pytest.approx(100 / 55)
    assert streaming["overhead_vs_full_at_budget"] == pytest.approx(55 / 50)
    assert streaming["kv_vs_full"] == pytest.approx(0.2)
    assert streaming["prefill_rss_vs_full"] == pytest.approx(150 / 600)
    assert streaming["stats_vs_kv"] == pytest.approx(8 / 512)
    assert streaming["kv_exact"] is True
    assert "cam_time_overhead" not in streaming
    assert cam["cam_time_overhead"] == pytest.approx(0.04)
    assert cam["cam_memory_overhead"] == pytest.approx((512 + 12) / (512 + 8) - 1)
    assert cam["cam_rss_overhead"] == pytest.approx(cam["cam_memory_overhead"])
    assert rows["streaming", 8192]["speedup_vs_full"] == pytest.approx(2.0)


def test_targets_on_hand_made_records():
    records = hand_made_records()
    records[2] = records[2] | {"kv_bytes_expected": records[2]["kv_bytes"] + 1}  # one inexact point
    got = {t["target"]: t for t in bench.targets(records, bench.ratios(records), [], 0.2)}
    overhead = got["decode ms/token <= 1.10 x full at context B"]
    assert overhead["value"] == pytest.approx(57.2 / 50) and overhead["met"] is False
    assert "streaming+cam L=1000" in overhead["where"]
    assert got["CaM extra decode time <= 5%"]["met"] is True
    assert got["CaM extra memory (KV + statistics) < 1%"]["met"] is True  # 4 more bytes per 520: 0.77%
    assert got["KV bytes == kept entries x bytes per entry"]["met"] is False
    assert got["statistics < 5% of KV bytes"]["value"] == pytest.approx(12 / 512)
    speed = got["decode throughput at 8k, 20% budget >= 1.5 x full"]
    assert speed["value"] == pytest.approx(2.0) and speed["met"] is True
    # an int budget is not "20%": no throughput target
    assert not any("8k" in t["target"] for t in bench.targets(records, bench.ratios(records), [], 256))


def test_stream_flatness_starts_once_the_cache_is_full():
    rows = [
        {"tokens_seen": 1000, "kv_bytes": 800, "ms_per_token": 5.0, "rss": 100},  # cache still filling
        {"tokens_seen": 2000, "kv_bytes": 1000, "ms_per_token": 8.0, "rss": 110},  # fills up during this one
        {"tokens_seen": 3000, "kv_bytes": 1000, "ms_per_token": 10.0, "rss": 120},
        {"tokens_seen": 4000, "kv_bytes": 1000, "ms_per_token": 10.5, "rss": 126},
    ]
    flat = bench.stream_flatness(rows)
    assert flat == {"first": 3000, "last": 4000, "ms_ratio": pytest.approx(1.05), "rss_ratio": pytest.approx(1.05)}
    got = {t["target"]: t["met"] for t in bench.targets([], [], rows, 0.2)}
    assert got == {"stream ms/token flat (last / first segment <= 1.10)": True,
                   "stream RSS flat (last / first segment <= 1.10)": True}  # fmt: skip


def test_points_measure_full_at_each_context_and_budget():
    config = bench.BenchConfig(methods=("h2o",), contexts=(100, 1000), batches=(1, 8), budget=0.2)
    points = [(p.method, p.context, p.batch, p.budget, p.for_context) for p in config.points()]
    assert points[:3] == [("full", 100, 1, None, None), ("full", 20, 1, None, 100), ("h2o", 100, 1, 20, None)]
    assert len(points) == 2 * 2 * 3 and points[-1] == ("h2o", 1000, 8, 200, None)
    assert bench.BenchConfig(budget=64).budget_for(1000) == 64


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--contexts", "512,abc"], "expected a positive integer"),
        (["--contexts", "0"], "expected a positive integer"),
        (["--budget", "1.5"], "a fraction must be in (0, 1)"),
        (["--budget", "lots"], "invalid budget"),
        (["--methods", "h2o,nope"], "unknown method"),
        (["--methods", "full"], "at least one compressing method"),
        (["--methods", "h2o+less"], "needs trained kernels"),
        (["--contexts", "100", "--budget", "100"], "nothing to compress"),
        (["--stream-tokens", "5000", "--stream-method", "full"], "full does not compress"),
        (["--batches", "1,x"], "expected a positive integer"),
        (["--stream-tokens", "500", "--stream-budget", "1024"], "must be below --stream-tokens"),
        (["--model", "./no/such/model"], "no such path"),
        (["--no-points"], "leaves nothing to run"),
    ],
)
def test_bad_input_is_refused_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("ran despite bad input"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compare_kvpress_without_kvpress_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "kvpress_version", lambda: None)
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("ran without kvpress"))
    with pytest.raises(SystemExit):
        run_cli(["--compare-kvpress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "--compare-kvpress needs the kvpress package" in err and "transformers<5.3" in err


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["bench", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "kvmerge bench --contexts" in text and "--compare-kvpress" in text


def test_compare_kvpress_side_by_side(tiny_dir):
    pytest.importorskip("kvpress", reason="kvpress is not installed (it pins transformers<5.3)")
    records = bench.compare_kvpress(str(tiny_dir), context=64, budget=16, tokens=8)
    by = {(r["library"], r["press"]): r for r in records}
    assert set(by) == {("full", "full")} | {(lib, p) for lib in ("kvmerge", "kvpress")
                                            for p in ("streaming", "tova", "snapkv", "cam")}  # fmt: skip
    assert by["full", "full"]["kept_per_head"] == 64 + 8
    for press in ("streaming", "tova", "snapkv"):  # compressed once after the prompt, then the 8 tokens appended
        assert by["kvmerge", press]["kept_per_head"] == by["kvpress", press]["kept_per_head"] == 16 + 8
    assert by["kvmerge", "cam"]["kept_per_head"] == by["kvpress", "cam"]["kept_per_head"] == 16
    for key in by:
        assert by[key]["kv_bytes"] == by[key]["kept_per_head"] * TINY_BYTES_PER_TOKEN
    # StreamingLLM keeps the same entries in both libraries (4 sinks + the most recent): same perplexity
    assert by["kvmerge", "streaming"]["ppl"] == pytest.approx(by["kvpress", "streaming"]["ppl"], rel=1e-5)
    assert by["kvmerge", "streaming"]["ppl"] != pytest.approx(by["full", "full"]["ppl"], rel=1e-5)
