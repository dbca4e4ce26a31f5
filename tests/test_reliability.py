"""Every mistake a user can make gets one clear line before any work (issue 16), from any folder.

Each test names the input it tries; the README's troubleshooting section lists the same inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import kvmerge
from kvmerge.cli import main
from kvmerge.eval import harness, results, sweep
from tests.conftest import VOCAB, tiny_model
from tests.test_cli import error_line, restore_globals  # noqa: F401  (the fixture restores what main changes)

REPO = Path(__file__).resolve().parents[1]
KVMERGE = Path(sys.executable).parent / "kvmerge"


def ids_of(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- the CLI: one line on stderr, exit status 2, before the model loads ---------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--method", "h2o", "--budget", "48", ""], "the prompt is empty"),
        (["generate", "--method", "h2o", "--budget", "48", "   "], "the prompt is empty"),
        (["generate", "--method", "streaming", "--budget", "3", "Hi"], "raise the budget to at least 4"),
        (["generate", "--method", "full", "--budget", "0.2", "Hi"], "keeps every entry and takes no budget"),
        (["eval", "ppl", "--methods", "h2o", "--budgets", "48", "--option", "sink=100"], "at least 100"),
        (["eval", "ppl", "--methods", "h2o", "--budgets", "0.2", "--limit", "1"], "at least 2"),
        (["eval", "growth", "--methods", "h2o", "--budgets", "64", "--limit", "1", "--every", "1"], "at least 2"),
        (["eval", "ppl", "--threads", "0"], "expected a positive count, got '0'"),
        (["generate", "--method", "h2o", "--budget", "48", "--model", "./no/model", "Hi"], "no model at './no/model'"),
    ],
)
def test_mistakes_are_one_line_before_the_model_loads(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(kvmerge, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(argv) == 2
    assert message in error_line(capsys)


def test_missing_data_folder_is_one_line_naming_the_variable(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KVMERGE_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr(kvmerge, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for argv in (
        ["eval", "qa"],
        ["eval", "summarization"],
        ["eval", "ppl"],
        ["ppl", "--method", "h2o", "--budget", "8"],
    ):
        assert main([*argv, "--out", str(tmp_path / "out")] if argv[0] == "eval" else argv) == 2
        assert "nowhere ($KVMERGE_DATA) is not a folder; set KVMERGE_DATA" in error_line(capsys)


def test_hub_models_are_accepted_and_fail_fast_offline(capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["generate", "--method", "h2o", "--budget", "48", "--model", "gpt2", "Hi"]) == 2
    assert "model 'gpt2' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in error_line(capsys)


def test_out_folders_are_never_overwritten_without_force(capsys, tiny_dir, text_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    for argv in (
        ["demo", "--model", str(tiny_dir), "--tokens", "40", "--methods", "full,tova"],
        ["eval", "ppl", "--model", str(tiny_dir), "--dataset", str(text_file), "--methods", "h2o", "--budgets", "8"],
        ["bench", "--contexts", "64", "--batches", "1", "--budget", "16", "--methods", "h2o"],
    ):
        assert main([*argv, "--out", str(out)]) == 2
        assert "already holds results: pass --force" in error_line(capsys)
    argv = ["eval", "ppl", "--model", str(tiny_dir), "--dataset", str(text_file), "--methods", "full,h2o"]
    assert main([*argv, "--budgets", "8", "--limit", "40", "--out", str(out), "--force", "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["benchmark"] == "ppl"


def test_report_renders_every_folder_kvmerge_writes_and_refuses_others(capsys, tiny_dir, tmp_path):
    demo = tmp_path / "demo"
    argv = ["demo", "--model", str(tiny_dir), "--tokens", "40", "--methods", "full,tova", "--no-progress"]
    assert main([*argv, "--out", str(demo)]) == 0
    capsys.readouterr()
    (demo / "results.md").unlink()
    assert main(["report", str(demo)]) == 0
    assert "tova" in capsys.readouterr().out and (demo / "results.md").is_file()
    for name, content in (("corrupt", "{bad"), ("list", "[]"), ("foreign", '{"a": 1}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(content)
        assert main(["report", str(tmp_path / name)]) == 2
        assert "results.json is not" in error_line(capsys)


def test_one_budget_ppl_plot_is_bars(monkeypatch, tmp_path):
    drawn = []
    monkeypatch.setattr(results, "bar_plot", lambda *args, **kwargs: drawn.append("bars"))
    monkeypatch.setattr(results, "line_plot", lambda *args, **kwargs: drawn.append("lines"))
    one = {"config": {"dataset": "d"}, "records": [{"method": m, "budget": 0.2, "ppl": 2.0} for m in ("a", "b")]}
    two = {"config": {"dataset": "d"}, "records": [{"method": "a", "budget": b, "ppl": 2.0} for b in (0.1, 0.2)]}
    sweep.render(one, tmp_path)
    sweep.render(two, tmp_path)
    assert drawn == ["bars", "lines"]


@pytest.mark.parametrize(
    "argv",
    [[], ["eval"], *([c] for c in ("methods", "generate", "ppl", "demo", "bench", "train-less", "calibrate-kvmerger")),
     *(["eval", b] for b in ("ppl", "qa", "summarization", "needle", "perturbation", "growth")), ["report"]],
)  # fmt: skip
def test_every_help_has_examples(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "  kvmerge " in out.split("example")[1]


@pytest.mark.parametrize(
    "argv",
    [["ppl"], ["demo"], ["bench"], ["train-less"], *(["eval", b] for b in ("ppl", "qa", "summarization", "needle",
     "perturbation", "growth"))],
)  # fmt: skip
def test_every_long_command_takes_no_progress_and_threads(capsys, argv):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    out = capsys.readouterr().out
    assert "--no-progress" in out and "--threads" in out


# ---- the library: ValueError/TypeError with the same messages ------------------------------------------------


def test_a_cache_reused_for_a_new_prompt_says_reset(llama):
    cache = kvmerge.make_cache(llama, "h2o", 8, chunk_size=4)
    with torch.no_grad():
        llama.generate(ids_of(20), **kvmerge.with_cache(llama, cache), max_new_tokens=2, do_sample=False)
        with pytest.raises(ValueError, match=r"holds 21 tokens of an earlier sequence .* call cache.reset\(\)"):
            llama.generate(ids_of(12, seed=1), **kvmerge.with_cache(llama, cache), max_new_tokens=2, do_sample=False)
        cache.reset()  # then the cache serves the new prompt as a fresh one would
        again = llama.generate(
            ids_of(12, seed=1), **kvmerge.with_cache(llama, cache), max_new_tokens=4, do_sample=False
        )
        fresh = kvmerge.make_cache(llama, "h2o", 8, chunk_size=4)
        alone = llama.generate(
            ids_of(12, seed=1), **kvmerge.with_cache(llama, fresh), max_new_tokens=4, do_sample=False
        )
    assert torch.equal(again, alone)


def test_a_batch_size_change_says_so(llama):
    cache = kvmerge.make_cache(llama, "h2o", 8, chunk_size=4)
    with torch.no_grad():
        llama(ids_of(20), **kvmerge.with_cache(llama, cache))
        with pytest.raises(ValueError, match=r"holds a batch of 1 sequences, this call has 3: call cache\.reset\(\)"):
            llama(ids_of(1, batch=3), **kvmerge.with_cache(llama, cache))


def test_lm_eval_model_rejects_an_unknown_method_before_loading(monkeypatch):
    monkeypatch.setattr(kvmerge, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=r"unknown selector 'nonsense'.*valid methods: full, streaming"):
        harness.KVMergeLM("default", method="nonsense", budget=0.2)


def test_lm_eval_tasks_declare_their_aggregation():
    for path in sorted(harness.TASKS_DIR.glob("kvmerge_*.yaml")):
        text = "\n".join(line for line in path.read_text().splitlines() if "!function" not in line)
        for metric in yaml.safe_load(text)["metric_list"]:
            assert metric.get("aggregation") == "mean" and metric.get("higher_is_better") is True, path.name


def test_lm_eval_records_git_quietly_outside_a_checkout(capfd, monkeypatch, tmp_path):
    import lm_eval.evaluator

    monkeypatch.chdir(tmp_path)
    with harness.quiet_git():
        assert lm_eval.evaluator.get_git_commit_hash() is None
    assert "fatal" not in capfd.readouterr().err
    assert lm_eval.evaluator.get_git_commit_hash is not None  # restored


# ---- transformers: no deprecation warning from any kvmerge path ----------------------------------------------


def test_no_kvmerge_path_warns(llama):
    cache = kvmerge.make_cache(llama, "h2o+cam", 16, chunk_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            llama(ids_of(40), **kvmerge.with_cache(llama, cache))
            llama.generate(ids_of(40), **kvmerge.with_cache(llama, kvmerge.make_cache(llama, "tova", 16)),
                           max_new_tokens=3, do_sample=False, pad_token_id=0)  # fmt: skip


def test_with_cache_names_the_argument_forward_takes():
    model = tiny_model("llama")
    import inspect

    takes = inspect.signature(type(model).forward).parameters
    assert list(kvmerge.with_cache(model, None)) == ["cache" if "cache" in takes else "past_key_values"]


# ---- from a folder outside the repository --------------------------------------------------------------------


@pytest.mark.skipif(not KVMERGE.is_file(), reason="the kvmerge console script is not installed")
def test_the_cli_from_outside_the_repo_finds_the_data_and_fails_cleanly(tiny_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KVMERGE_DATA"} | {"HF_HUB_OFFLINE": "1"}

    def kvmerge_cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(KVMERGE), *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    if (REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw").is_file():
        done = kvmerge_cli("ppl", "--model", str(tiny_dir), "--method", "h2o", "--budget", "16", "--tokens", "40",
                           "--no-progress", "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["data"] == "wikitext2" and "Warning" not in done.stderr, done.stderr
    short = kvmerge_cli("generate", "--model", str(tiny_dir), "--method", "h2o", "--budget", "0.2", "--raw",
                        "--max-new-tokens", "2", "The sea is")  # fmt: skip
    assert short.returncode == 0, short.stderr
    warned = [line for line in short.stderr.splitlines() if "warning" in line.lower()]
    assert warned == [
        "kvmerge: warning: budget 0.2 of a prompt under 160 tokens keeps fewer than 32 entries per "
        "head: output quality may collapse; for a short prompt pass an int budget (e.g. 48 entries)"
    ]
    failed = kvmerge_cli("ppl", "--method", "h2o", "--budget", "0.2", "--model", "gpt2")
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "HF_HUB_OFFLINE" in failed.stderr
