"""The ``kvmerge`` command: budgets, one-line user errors with exit status 2, JSON output, demo files."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
import transformers

import kvmerge
from kvmerge.cli import main, parse_budget

RESULT_KEYS = {"method", "budget", "model", "tokens", "ppl", "nll", "kv_bytes", "kv_bytes_full", "seconds"}


@pytest.fixture(autouse=True)
def restore_globals():
    """``main`` sets torch's thread count (``--threads``, default 1) and may turn transformers' progress bars
    off (``--no-progress``): restore both for the other tests."""
    threads, bars = torch.get_num_threads(), transformers.utils.logging.is_progress_bar_enabled()
    yield
    torch.set_num_threads(threads)
    if bars:
        transformers.utils.logging.enable_progress_bar()


def error_line(capsys) -> str:
    """The one ``kvmerge: error:`` line stderr must end with (after progress bars, if any)."""
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("kvmerge: error: ") and err.endswith(last + "\n") and "Traceback" not in err, err
    return last


@pytest.mark.parametrize(("text", "value"), [("0.2", 0.2), ("256", 256), ("20%", 0.2), (" 1.0 ", 1.0), ("1", 1)])
def test_parse_budget(text, value):
    parsed = parse_budget(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["abc", "", "0.2.1", "%"])
def test_parse_budget_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="invalid budget"):
        parse_budget(text)


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    methods, parts = out.split("\n\n")[:2]
    listed = [line.split()[0] for line in methods.splitlines()[2:]]
    assert listed == kvmerge.method_names()
    assert "Cache Merging" in out
    cam = next(line for line in parts.splitlines() if line.startswith("absorber  cam"))
    assert "normalizer=max" in cam and "gate=expected" in cam and "centered=True" in cam


@pytest.mark.parametrize("command", ["methods", "generate", "ppl", "demo", "train-less", "calibrate-kvmerger"])
def test_help_has_examples(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: kvmerge" in out and f"kvmerge {command}" in out.split("examples:")[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ppl", "--method", "nope", "--budget", "0.2"], "valid methods: full, streaming, h2o, scissorhands, tova"),
        (["generate", "--method", "h2o+nope", "--budget", "8", "hi"], "valid absorbers: cam"),
        (["ppl", "--method", "h2o", "--budget", "abc"], "invalid budget 'abc'"),
        (["ppl", "--method", "h2o", "--budget", "1.5"], r"fraction in (0, 1]"),
        (["ppl", "--method", "h2o", "--budget", "0"], "budget must be > 0"),
        (["ppl", "--method", "h2o"], "needs a budget"),
        (["ppl", "--method", "h2o", "--budget", "0.2", "--data", "missing.txt"], "no such text file: 'missing.txt'"),
        (["ppl", "--method", "h2o", "--budget", "0.2", "--data", "wikitext3"], "valid: wikitext2, pg-essays"),
        (["ppl", "--method", "h2o", "--budget", "0.2", "--tokens", "0"], "expected a positive integer"),
        (["demo", "--methods", "full,h2o,nope"], "unknown selector 'nope'"),
        (["ppl", "--budget", "0.2"], "required: --method"),
        (["eval", "ppl", "--budgets", "0.2,1.5"], r"fraction in (0, 1]"),
        (["eval", "needle", "--methods", "h2o", "--budgets", "0"], "budget must be > 0"),
        (["eval", "qa", "--methods", "h2o,nope"], "unknown method(s) ['nope']"),
        (["eval", "ppl", "--limit", "0"], "--limit must be a positive count"),
        (
            ["eval", "ppl", "--methods", "full,h2o", "--option", "kernels=x"],
            "no method of full,h2o takes option(s) kernels",
        ),
        (["eval", "needle", "--option", "merge_window"], "expected KEY=VALUE"),
        (["eval", "ppl", "--methods", "h2o+cam", "--option", "merge_window=0"], "merge_window must be >= 1"),
        (["eval", "ppl", "--methods", "snapkv", "--budgets", "0.5"], "teacher-forced scoring would see the full"),
        (["ppl", "--method", "h2o+kvmerger", "--budget", "0.5"], "compresses once after a prompt"),
        (["eval", "ppl", "--model", "./no/such/model"], "no model at './no/such/model'"),
        (["report", "no/such/dir"], "no/such/dir/results.json not found"),
        (["train-less", "--method", "h2o+cam", "--budget", "0.2"], "train-less takes a selector"),
        (["train-less", "--method", "h2o", "--budget", "2.0"], r"fraction in (0, 1]"),
        (["calibrate-kvmerger", "--target", "1.5"], "in (0, 1)"),
        ([], "required: COMMAND"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    assert message in error_line(capsys)


def test_errors_found_after_loading_exit_2(capsys, monkeypatch, tiny_dir, text_file, tmp_path):
    base = ["ppl", "--method", "h2o", "--budget", "0.2", "--data", str(text_file)]
    assert main([*base, "--model", str(tiny_dir), "--tokens", "100000"]) == 2
    assert "fewer than the 100000 requested" in error_line(capsys)
    assert main([*base, "--model", str(tmp_path / "no-such-model")]) == 2
    assert f"no model at '{tmp_path / 'no-such-model'}'" in error_line(capsys)
    monkeypatch.setitem(sys.modules, "datasets", None)  # no download fallback
    assert main([*base, "--model", str(tiny_dir), "--data", "wikitext2", "--data-dir", str(tmp_path)]) == 2
    assert "wikitext2/wiki.test.raw not found" in error_line(capsys)


def test_ppl_json_is_one_object(capsys, tiny_dir, text_file):
    argv = ["ppl", "--model", str(tiny_dir), "--method", "h2o+cam", "--budget", "0.25", "--data", str(text_file)]
    assert main([*argv, "--tokens", "60", "--chunk", "2", "--seed", "1", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert captured.out.count("\n") == 1 and set(result) >= RESULT_KEYS
    assert (result["method"], result["budget"], result["budget_tokens"], result["tokens"]) == ("h2o+cam", 0.25, 15, 60)
    assert (result["chunk"], result["seed"], result["threads"]) == (2, 1, 1)
    assert result["kv_bytes"] * 4 == result["kv_bytes_full"]  # 15 of 60 entries
    assert "60/60" in captured.err  # the progress bar


def test_ppl_table(capsys, tiny_dir, text_file):
    argv = ["ppl", "--model", str(tiny_dir), "--method", "full", "--data", str(text_file), "--tokens", "40"]
    assert main([*argv, "--no-progress"]) == 0
    captured = capsys.readouterr()
    header, _, row = captured.out.splitlines()
    assert header.split()[:3] == ["method", "budget", "ppl"]
    assert row.split()[:2] == ["full", "-"] and " 100.00 " in row
    assert captured.err == ""


def test_generate_streams_and_summarises(capsys, tiny_dir):
    argv = ["generate", "--model", str(tiny_dir), "--method", "streaming", "--budget", "6", "--raw"]
    assert main([*argv, "--max-new-tokens", "12", "The sea"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n")
    summary = captured.err.strip().splitlines()[-1]
    assert summary.startswith("kvmerge: streaming, budget 6:") and "tokens seen" in summary
    assert "6 entries kept per head of " in summary and "MiB full" in summary


def test_demo_command(capsys, tiny_dir, tmp_path):
    argv = ["demo", "--model", str(tiny_dir), "--tokens", "40", "--methods", "full,tova", "--out", str(tmp_path)]
    assert main([*argv, "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["full", "tova"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["budget_tokens"] for r in saved["results"]] == [None, 8]
    assert (tmp_path / "ppl_memory.png").stat().st_size > 10_000


@pytest.mark.integration
def test_ppl_json_on_smollm2(capsys):
    argv = ["ppl", "--method", "h2o+cam", "--budget", "0.25", "--data", "pg-essays", "--tokens", "64", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= RESULT_KEYS
    assert result["model"] == "SmolLM2-135M-Instruct" and result["kept_tokens"] == 16
    assert 1 < result["ppl"] < 1000


@pytest.mark.integration
def test_generate_with_chat_template_on_smollm2(capsys):
    argv = ["generate", "--method", "h2o+cam", "--budget", "0.5", "--max-new-tokens", "8", "What is 2 + 2?"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()  # some text was streamed
    assert "8 new tokens" in captured.err or "new tokens" in captured.err


def test_train_less_and_calibrate_kvmerger_commands(capsys, tiny_dir, tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("KVMERGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "kernels"
    argv = ["--model", str(tiny_dir), "--sequences", "2", "--tokens", "48", "--epochs", "2", "--out", str(out)]
    assert main(["train-less", "--method", "h2o", "--budget", "0.5", "--no-progress", *argv]) == 0
    assert (out / "kernels.pt").is_file() and (out / "config.json").is_file() and (out / "loss.png").is_file()
    assert f"kernels: {out}" in capsys.readouterr().out
    cache = kvmerge.make_cache(kvmerge.load_model(str(tiny_dir))[0], "h2o+less", 0.5, kernels=str(out))
    assert cache.method.name == "h2o+less"
    ppl = ["ppl", "--model", str(tiny_dir), "--method", "h2o+less", "--budget", "0.5", "--data", str(text_file)]
    assert main([*ppl, "--tokens", "40"]) == 2  # no kernels in the default directory: the command that makes them
    assert f"kvmerge train-less --model {tiny_dir} --method h2o --budget 0.5" in error_line(capsys)
    assert main([*ppl, "--tokens", "40", "--option", f"kernels={out}", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "h2o+less"
    generate = ["generate", "--model", str(tiny_dir), "--method", "h2o+less", "--budget", "0.5", "--raw"]
    assert main([*generate, "--option", f"kernels={out}", "--max-new-tokens", "4", "The sea"]) == 0
    assert main(["calibrate-kvmerger", "--target", "0.5", "--model", str(tiny_dir), "--tokens", "64"]) == 0
    printed = capsys.readouterr().out
    assert "similarity=" in printed and "(target 0.5)" in printed
