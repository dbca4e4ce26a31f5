"""Resumable evaluation runs (issue 19): records written after every run, a rerun with --resume skips
what is done and adds the rest, and a folder measured on another configuration, data or version is
refused instead of mixed."""

from __future__ import annotations

import json

import pytest

import kvmerge
from kvmerge.cli import main
from kvmerge.eval import results, sweep
from kvmerge.eval.results import Ledger, ResumeRefused, digest

CONFIG = {
    "model": "m",
    "dataset": "d",
    "methods": ["full", "h2o"],
    "budgets": [0.2],
    "seeds": [0],
    "tokens": 40,
    "data_sha256": "ab",
}


def record(method, budget, seed=0, **more):
    return {"method": method, "budget": budget, "seed": seed, "ppl": 1.0, **more}


def test_digest_depends_on_every_part_and_its_boundaries(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("abc")
    assert digest("abc") == digest(path) == digest(b"abc")
    assert len(digest("abc")) == 16 and digest("abc") != digest("abd")
    assert digest("ab", "c") != digest("a", "bc")  # parts are delimited, not concatenated


def test_a_ledger_writes_every_run_and_a_resumed_one_continues(tmp_path):
    ledger = Ledger(tmp_path, "ppl", CONFIG)
    ledger.add([record("full", 0.2)])
    assert [r["method"] for r in results.read_results(tmp_path)["records"]] == ["full"]  # written at once
    ledger.add([record("h2o", 0.2)])
    resumed = Ledger(tmp_path, "ppl", {**CONFIG, "methods": ["h2o", "tova"], "budgets": [0.2, 0.5]}, resume=True)
    assert resumed.done("full", None, 0) and resumed.done("h2o", 0.2, 0)  # full's None matches any budget
    assert not resumed.done("h2o", 0.5, 0) and not resumed.done("tova", 0.2, 0) and not resumed.done("h2o", 0.2, 1)
    resumed.add([record("tova", 0.2)])
    written = results.read_results(tmp_path)
    assert [r["method"] for r in written["records"]] == ["full", "h2o", "tova"]
    assert written["config"]["methods"] == ["full", "h2o", "tova"] and written["config"]["budgets"] == [0.2, 0.5]
    assert not Ledger(tmp_path, "ppl", CONFIG).done("full", None, 0)  # without resume: a new run


def test_done_matches_extra_keys_and_extra_lists_are_kept(tmp_path):
    ledger = Ledger(tmp_path, "ppl", CONFIG, examples=[])
    ledger.add([record("h2o", 0.2, length=256)], examples=[{"index": 0}])
    resumed = Ledger(tmp_path, "ppl", CONFIG, resume=True, examples=[])
    assert resumed.done("h2o", 0.2, 0, length=256) and not resumed.done("h2o", 0.2, 0, length=512)
    resumed.add([record("h2o", 0.2, length=512)], examples=[{"index": 1}])
    assert results.read_results(tmp_path)["examples"] == [{"index": 0}, {"index": 1}]


@pytest.mark.parametrize(
    "change, named",
    [
        ({"tokens": 80}, "tokens"),
        ({"data_sha256": "cd"}, "data_sha256"),
        ({"chunk": 4}, "chunk"),
    ],
)
def test_resuming_another_configuration_or_data_is_refused(tmp_path, change, named):
    Ledger(tmp_path, "ppl", CONFIG).add([record("full", 0.2)])
    with pytest.raises(ResumeRefused, match=f"its {named} differ"):
        Ledger(tmp_path, "ppl", {**CONFIG, **change}, resume=True)
    with pytest.raises(ResumeRefused, match="holds ppl results, not qa"):
        Ledger(tmp_path, "qa", CONFIG, resume=True)


def test_resuming_results_of_another_version_is_refused(tmp_path, monkeypatch):
    Ledger(tmp_path, "ppl", CONFIG).add([record("full", 0.2)])
    real = results.versions()
    monkeypatch.setattr(results, "versions", lambda: {**real, "transformers": "9.9.9"})
    with pytest.raises(ResumeRefused, match="transformers version differ"):
        Ledger(tmp_path, "ppl", CONFIG, resume=True)


def test_an_interrupted_sweep_keeps_its_runs_and_resumes_only_the_rest(tiny_dir, text_file, tmp_path, monkeypatch):
    tiny = kvmerge.load_model(str(tiny_dir))
    data = str(text_file)
    computed = []
    measure = sweep.streaming_perplexity

    def counted(model, tokenizer, text, method, budget, **kwargs):
        if method == "tova" and not computed.count("resumed"):
            raise KeyboardInterrupt  # the run stops during its third method
        computed.append(method)
        return measure(model, tokenizer, text, method, budget, **kwargs)

    monkeypatch.setattr(sweep, "streaming_perplexity", counted)
    methods = ["full", "h2o", "tova"]
    with pytest.raises(KeyboardInterrupt):
        sweep.run_ppl_sweep(*tiny, data, methods, [0.5], [0], tokens=30, out_dir=tmp_path, progress=False)
    first = results.read_results(tmp_path)["records"]
    assert [r["method"] for r in first] == ["full", "h2o"]
    computed.append("resumed")
    records = sweep.run_ppl_sweep(
        *tiny, data, methods, [0.5], [0], tokens=30, out_dir=tmp_path, progress=False, resume=True
    )
    assert computed == ["full", "h2o", "resumed", "tova"]  # only the missing run was measured
    assert records[:2] == first and [r["method"] for r in records] == methods
    with pytest.raises(ResumeRefused, match="tokens differ"):
        sweep.run_ppl_sweep(*tiny, data, methods, [0.5], [0], tokens=20, out_dir=tmp_path, resume=True)


def test_eval_resume_on_the_command_line(capsys, tiny_dir, text_file, tmp_path):
    out = tmp_path / "run"
    base = ["eval", "ppl", "--model", str(tiny_dir), "--dataset", str(text_file), "--budgets", "0.5"]
    argv = [*base, "--limit", "30", "--out", str(out), "--no-progress"]
    assert main([*argv, "--methods", "full,h2o"]) == 0
    created = json.loads((out / "results.json").read_text())["records"]
    capsys.readouterr()
    assert main([*argv, "--methods", "full,h2o,tova"]) == 2
    assert "pass --force to overwrite them, --resume to continue them" in capsys.readouterr().err
    assert main([*argv, "--methods", "full,h2o,tova", "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())["records"]
    assert resumed[:2] == created and [r["method"] for r in resumed] == ["full", "h2o", "tova"]
    capsys.readouterr()
    assert main([*base, "--limit", "20", "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "its tokens differ" in capsys.readouterr().err
    assert main([*argv, "--resume", "--force"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_qa_resumes_task_by_task(tiny_dir, tmp_path, monkeypatch):
    import lm_eval

    from kvmerge.eval.qa import run_qa

    model, tokenizer = kvmerge.load_model(str(tiny_dir))
    evaluate, asked = lm_eval.simple_evaluate, []

    def counted(model, tasks, **kwargs):
        asked.append((model.method, *tasks))
        if (model.method, *tasks) == ("h2o", "kvmerge_rte"):
            raise KeyboardInterrupt  # stopped in the second task of the second run
        return evaluate(model=model, tasks=tasks, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", counted)
    tasks = ("kvmerge_copa", "kvmerge_rte")
    options = dict(tasks=tasks, limit=3, out_dir=tmp_path, batch_size=4, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_qa(model, tokenizer, ["full", "h2o"], [0.5], [0], **options)
    first = results.read_results(tmp_path)["records"]
    assert [(r["method"], r["task"]) for r in first] == [("full", "copa"), ("full", "rte"), ("h2o", "copa")]
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda model, tasks, **kwargs: asked.append(tasks) or evaluate(
        model=model, tasks=tasks, **kwargs))  # fmt: skip
    asked.clear()
    records = run_qa(model, tokenizer, ["full", "h2o"], [0.5], [0], resume=True, **options)
    assert asked == [["kvmerge_rte"]] and records[:3] == first and len(records) == 4
    assert all(len(r["outcomes"]) == r["n"] == 3 for r in records)


def test_a_published_cell_is_measured_again_by_its_command(capsys, tiny_dir, tmp_path):
    from kvmerge.eval.paired import paired_bootstrap
    from kvmerge.eval.qa import run_qa

    model, tokenizer = kvmerge.load_model(str(tiny_dir))
    run_qa(
        model, tokenizer, ["full", "h2o", "h2o+cam"], [0.5], [0], tasks=("kvmerge_copa",), limit=6,
        out_dir=tmp_path / "run", batch_size=4, model_name=str(tiny_dir), progress=False,
    )  # fmt: skip
    published = tmp_path / "docs" / "table.json"
    assert main(["report", str(tmp_path / "run"), "--publish", str(published)]) == 0
    table = json.loads(published.read_text())
    cell = table["cells"]["copa"]["h2o@0.5"]
    assert cell["n"] == 6 and len(cell["outcomes"]) == 6 and cell["outcomes_sha256"] == digest(cell["outcomes"])
    (paired,) = table["paired"]
    base = [int(c) for c in cell["outcomes"]]
    merged = [int(c) for c in table["cells"]["copa"]["h2o+cam@0.5"]["outcomes"]]
    assert paired["method"] == "h2o+cam" and paired["diff"] == paired_bootstrap(base, merged)["diff"]
    argv = cell["command"].split()[1:]  # the command, as printed beside the table
    assert argv[argv.index("--out") + 1] == "runs/cell-copa-h2o" and f"--model {tiny_dir}" in cell["command"]
    argv[argv.index("--out") + 1] = str(tmp_path / "cell")
    assert main([*argv, "--no-progress"]) == 0
    (again,) = results.read_results(tmp_path / "cell")["records"]
    assert (again["acc"], "".join(map(str, again["outcomes"]))) == (cell["acc"], cell["outcomes"])
    capsys.readouterr()
    assert main(["report", str(tmp_path / "cell"), "--publish", str(published)]) == 0  # any qa folder
    Ledger(tmp_path / "ppl", "ppl", CONFIG).add([record("full", 0.2)])
    assert main(["report", str(tmp_path / "ppl"), "--publish", str(published)]) == 2
    assert "--publish takes an `eval qa` folder" in capsys.readouterr().err
