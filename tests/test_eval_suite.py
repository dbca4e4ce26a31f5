"""The evaluation suite: metrics on hand-computed cases, the lm-eval model against the plain model, and every
benchmark end to end on a tiny random Llama with the real SmolLM2 tokenizer and slices of the real data."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import kvmerge
from kvmerge.eval import harness, lm_eval_hook, local, needle, results, summarization
from kvmerge.eval.commands import add_eval_commands
from kvmerge.models import default_model_path

DATA = Path(os.environ.get("KVMERGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no evaluation data at {DATA}")


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama (2 layers, 4 query / 2 KV heads) over SmolLM2's tokenizer and vocabulary."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(autouse=True)
def data_dir(monkeypatch):
    monkeypatch.setenv("KVMERGE_DATA", str(DATA))


# -- metrics on hand-computed cases ---------------------------------------------------------------


def test_rouge_on_known_strings():
    assert summarization.rouge("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    )
    # unigrams: 1 of 2 match both ways -> F = 0.5; no bigram in common; LCS = 1 -> 0.5
    assert summarization.rouge("the dog", "the cat") == pytest.approx({"rouge1": 0.5, "rouge2": 0.0, "rougeL": 0.5})
    # stemming: "cats" matches "cat"; prediction 3 tokens, reference 2: P = 2/3, R = 1 -> F = 0.8
    assert summarization.rouge("black cats run", "black cat")["rouge1"] == pytest.approx(0.8)


def test_generation_is_cut_at_helm_stops():
    assert summarization.cut_at_stop("\n\n A short summary.\nNext article ###") == "A short summary."
    assert summarization.cut_at_stop("One sentence. ### Article: more") == "One sentence."


def test_needle_scoring_and_insertion():
    assert needle.is_correct("You should sit in Dolores  Park.")
    assert needle.is_correct("DOLORES PARK, with a sandwich")
    assert not needle.is_correct("Eat a sandwich in Golden Gate Park.")
    text = "One. Two. Three. Four."
    assert needle.insert_needle(text, "N.", 0.0) == "N. One. Two. Three. Four."
    assert needle.insert_needle(text, "N.", 0.5) == "One. Two. N. Three. Four."
    assert needle.insert_needle(text, "N.", 1.0) == "One. Two. Three. N. Four."


def test_table_counts_mean_and_std_over_seeds():
    records = [
        {"method": "h2o+cam", "task": "copa", "seed": 0, "acc": 0.5},
        {"method": "h2o+cam", "task": "copa", "seed": 1, "acc": 0.7},
        {"method": "h2o+cam", "task": "rte", "seed": 0, "acc": 0.25},
        {"method": "full", "task": "copa", "seed": 0, "acc": 1.0},
    ]
    lines = results.markdown_table(records, ("method",), "task", "acc", scale=100, mean_column=True).splitlines()
    assert lines[0] == "| method | copa | rte | mean |"
    std = math.sqrt(2) * 10  # sample std of 50 and 70
    assert lines[2] == f"| h2o+cam | 60.0 ± {std:.1f} | 25.0 | 42.5 |"
    assert lines[3] == "| full | 100.0 | – | 100.0 |"
    assert results.is_seeded("random") and not results.is_seeded("h2o")
    assert not results.is_seeded("h2o+cam")  # the expected gate draws nothing
    assert results.is_seeded("h2o+cam", {"gate": "bernoulli"}) and not results.is_seeded("h2o+less", {"kernels": "x"})


# -- the lm-eval tasks and model ------------------------------------------------------------------


@needs_data
def test_tasks_follow_lm_eval_prompts_on_local_data():
    tasks = harness.task_manager(DATA, include_defaults=False).load(list(harness.QA_TASKS))["tasks"]
    expected = {  # first document: prompt, choices[:2], gold index
        "kvmerge_copa": ("The man turned on the faucet therefore", [" the toilet filled with water."], 1),
        "kvmerge_piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", None, 0),
        "kvmerge_openbookqa": ("A person wants to start saving money", ["make more phone calls"], 1),
        "kvmerge_winogrande": (
            1,
            ["Sarah was a much better surgeon than Maria so Sarah"],
            "always got the easier cases.",
        ),
        "kvmerge_rte": ("Dana Reeve, the widow", ["True", "False"], 1),
        "kvmerge_mathqa": ("Question: a shopkeeper sold an article", ["38", "27.675"], 0),
    }
    sizes = {"kvmerge_copa": 100, "kvmerge_piqa": 1838, "kvmerge_openbookqa": 500, "kvmerge_winogrande": 1267}
    for name, (text, choices, target) in expected.items():
        task = tasks[name]
        doc = next(iter(task.eval_docs))
        prompt = task.doc_to_text(doc)
        assert prompt == text if isinstance(text, int) else prompt.startswith(text), name
        if choices:
            assert task.doc_to_choice(doc)[: len(choices)] == choices, name
        assert task.doc_to_target(doc) == target, name
        if name in sizes:
            assert len(task.eval_docs) == sizes[name]


def lm_of(tiny, method: str, **options) -> harness.KVMergeLM:
    model, tokenizer = tiny
    return harness.KVMergeLM(model, tokenizer, method=method, batch_size=3, device="cpu", **options)


def plain_logprobs(model, sequence: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]


REQUESTS = [
    (("The man turned on the faucet therefore", " the toilet filled with water."), None),
    (("Question: How do I ready a guinea pig cage?\nAnswer:", " Fill it with straw."), None),
    (("Short", " one"), None),
    (("A somewhat longer context with a few more words in it than the others", " ending here."), None),
]


def tokenized(lm: harness.KVMergeLM) -> list:
    return [((c, x), *lm._encode_pair(c, x)) for (c, x), _ in REQUESTS]


def test_full_loglikelihood_equals_plain_model(tiny):
    lm = lm_of(tiny, "full")
    requests = tokenized(lm)
    scores = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for (_, context, continuation), (logprob, greedy) in zip(requests, scores, strict=True):
        expected = plain_logprobs(tiny[0], context + continuation)[-len(continuation) :]
        assert logprob == pytest.approx(float(expected.sum()), abs=1e-4)
        assert isinstance(greedy, bool)


def test_budget_above_length_equals_full_and_batch_equals_alone(tiny):
    full = lm_of(tiny, "full")._loglikelihood_tokens(tokenized(lm_of(tiny, "full")), disable_tqdm=True)
    roomy = lm_of(tiny, "h2o+cam", budget=10_000, seed=1)
    assert [s for s, _ in roomy._loglikelihood_tokens(tokenized(roomy), disable_tqdm=True)] == pytest.approx(
        [s for s, _ in full], abs=1e-4
    )
    tight = lm_of(tiny, "h2o+cam", budget=0.3, seed=1, chunk=1)
    batched = [s for s, _ in tight._loglikelihood_tokens(tokenized(tight), disable_tqdm=True)]
    alone = [tight._loglikelihood_tokens([r], disable_tqdm=True)[0][0] for r in tokenized(tight)]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert batched != pytest.approx([s for s, _ in full], abs=1e-3)  # a 30% budget changes the scores


# -- every benchmark end to end on the tiny model ---------------------------------------------------


def read_results(out: Path) -> dict:
    assert (out / "results.md").is_file() and list(out.glob("*.png"))
    payload = json.loads((out / "results.json").read_text())
    assert {"torch", "transformers", "lm_eval", "kvmerge"} <= payload["versions"].keys()
    return payload


@needs_data
def test_qa_end_to_end(tiny, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from kvmerge.eval.qa import run_qa

    tasks = ("kvmerge_copa", "kvmerge_rte")
    records = run_qa(*tiny, ["full", "h2o+cam"], [0.5, 1.0], [0, 1], tasks, limit=6, out_dir=tmp_path, batch_size=8,
                     chunk=4, options={"gate": "bernoulli"}, progress=False)  # fmt: skip
    assert len(records) == 5 * len(tasks)  # full once, h2o+cam (Bernoulli-gated: seeded) at two budgets, two seeds
    acc = {(r["method"], r["budget"], r["seed"], r["task"]): r["acc"] for r in records}
    assert all(r["n"] == len(r["outcomes"]) == 6 and sum(r["outcomes"]) / 6 == r["acc"] for r in records)
    # the oracle: lm-eval's own hf model with a full cache scores the same documents the same way
    reference = lm_eval.simple_evaluate(model=HFLM(pretrained=tiny[0], tokenizer=tiny[1], batch_size=8),
                                        tasks=list(tasks), limit=6, task_manager=harness.task_manager(),
                                        verbosity="WARNING")  # fmt: skip
    for task in tasks:
        name = task.removeprefix("kvmerge_")
        assert acc["full", None, 0, name] == reference["results"][task]["acc,none"]
        assert acc["h2o+cam", 1.0, 0, name] == acc["h2o+cam", 1.0, 1, name] == acc["full", None, 0, name]
    payload = read_results(tmp_path)
    (tmp_path / "results.md").unlink()
    results.render_report(tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "| method | budget | copa | rte | mean |" in table and " (6)" in table
    assert "| h2o+cam | 0.5 |" in table and "| full | None |" in table
    assert "| copa | h2o+cam vs h2o |" not in table  # no h2o alone ran: nothing to pair with
    assert len(payload["records"]) == len(records)


@needs_data
@pytest.mark.parametrize("dataset", ["xsum", "cnn_dailymail"])
def test_summarization_end_to_end(tiny, tmp_path, dataset):
    records = summarization.run_summarization(
        *tiny, dataset, ["full", "streaming"], [0.5, 1.0], [0], limit=2, out_dir=tmp_path, max_new_tokens=6,
        batch_size=2, progress=False,
    )  # fmt: skip
    assert [(r["method"], r["budget"]) for r in records] == [("full", None), ("streaming", 0.5), ("streaming", 1.0)]
    examples = read_results(tmp_path)["examples"]
    assert len(examples) == 6
    by = {(e["method"], e["budget"], e["index"]): e for e in examples}
    for index in range(2):  # a budget that holds every entry generates what the full cache does
        assert by["streaming", 1.0, index]["prediction"] == by["full", None, index]["prediction"]
    docs = local.read_jsonl(local.data_dir() / summarization.DATASETS[dataset][0], 2)
    for example in examples:  # the stored scores are ROUGE of the stored prediction against the reference
        scores = summarization.rouge(example["prediction"], docs[example["index"]]["summary_gt"])
        assert all(example[k] == pytest.approx(v) for k, v in scores.items())


def test_needle_end_to_end(tiny, tmp_path):
    records = needle.run_needle(
        *tiny,
        ["full", "h2o+cam"],
        [0.5],
        [0],
        lengths=[48, 96],
        depths=[0.0, 1.0],
        out_dir=tmp_path,
        chunk=8,
        max_new_tokens=4,
    )
    assert len(records) == 2 * 2 * 2 and all(r["correct"] == needle.is_correct(r["answer"]) for r in records)
    read_results(tmp_path)
    roomy = needle.run_needle(*tiny, ["full", "h2o+cam"], [1.0], [0], lengths=[48], depths=[0.0, 1.0], chunk=8,
                              max_new_tokens=4, progress=False)  # fmt: skip
    answers = {(r["method"], r["depth"]): r["answer"] for r in roomy}
    assert answers["h2o+cam", 0.0] == answers["full", 0.0] and answers["h2o+cam", 1.0] == answers["full", 1.0]
    assert (tmp_path / "needle_h2o_cam_0.5.png").is_file()


def test_perturbation_is_zero_with_room_and_grows_when_tight(tiny, tmp_path):
    from kvmerge.eval.perturbation import run_perturbation

    text = "The quick brown fox jumps over the lazy dog. " * 20
    roomy = run_perturbation(*tiny, text, ["h2o", "h2o+cam"], [1.0], [0], tokens=48)
    assert len(roomy) == 2 * 2 and all(r["rel_error"] < 1e-5 for r in roomy)
    tight = run_perturbation(
        *tiny, text, ["streaming", "streaming+cam"], [0.2], [0], tokens=48, out_dir=tmp_path,
        options={"normalizer": "mean"},
    )  # fmt: skip
    assert all(r["rel_error"] > 1e-4 for r in tight)
    merging = [r for r in tight if r["method"] == "streaming+cam"]
    assert all(0.0 < r["pass_rate"] <= 1.0 and r["merges_per_step"] > 0 for r in merging)
    assert all("pass_rate" not in r for r in tight if r["method"] == "streaming")
    assert all(r["value_norm_max"] >= r["value_norm_mean"] > 0 for r in tight)
    read_results(tmp_path)
    report = (tmp_path / "results.md").read_text()
    assert "gate pass rate" in report and (tmp_path / "merging_growth_max_0.2.png").is_file()


@needs_data
def test_ppl_sweep_end_to_end(tiny, tmp_path):
    from kvmerge.eval.sweep import run_ppl_sweep

    records = run_ppl_sweep(*tiny, "wikitext2", ["full", "streaming"], [0.25, 1.0], [0], tokens=40, out_dir=tmp_path)
    by = {(r["method"], r["budget"]): r["ppl"] for r in records}
    assert by["full", 0.25] == by["full", 1.0] == pytest.approx(by["streaming", 1.0], rel=1e-4)
    assert by["streaming", 0.25] != pytest.approx(by["full", 0.25], rel=1e-4)
    read_results(tmp_path)


def test_commands_parse_and_report(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="kvmerge")
    add_eval_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "qa", "--methods", "h2o,h2o+cam", "--budgets", "0.2,256", "--seeds", "0,1"])
    assert (args.methods, args.budgets, args.seeds, args.limit) == (["h2o", "h2o+cam"], [0.2, 256], [0, 1], None)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "qa", "--methods", "nope"])
    records = [{"method": "h2o", "budget": 0.2, "seed": 0, "task": "copa", "acc": 0.5, "seconds": 1.0}]
    results.write_results(tmp_path, "qa", {"limit": 2}, records)
    args = parser.parse_args(["report", str(tmp_path)])
    assert args.func(args) == 0
    assert "| h2o | 0.2 | 50.0 | 50.0 |" in capsys.readouterr().out


def test_lm_eval_hook_registers_model_and_tasks(tmp_path):
    """The ``.pth`` file that ``make install`` writes: a fresh interpreter with it knows the ``kvmerge``
    model and the ``kvmerge_*`` tasks through lm-eval's own registry and TaskManager, and without it does not."""
    pth = lm_eval_hook.install(tmp_path)
    assert pth.name == "kvmerge-lm-eval.pth" and "torch" not in pth.read_text()
    # Python without its site hooks (-S), packages on the path by hand: this environment's own hook (make
    # install) never runs, so "off" is observed here too; "on" adds the folder holding the new hook.
    paths = [sysconfig.get_paths()["purelib"], str(Path(kvmerge.__file__).parents[1])]
    probe = (
        f"import site, sys; sys.path += {paths!r}; sys.argv[1] == 'on' and site.addsitedir(sys.argv[2]); "
        "from lm_eval.api.registry import get_model; from lm_eval.tasks import TaskManager; "
        "tasks = TaskManager(include_defaults=False).all_tasks; "
        "print(get_model('kvmerge').__name__, 'kvmerge_copa' in tasks, 'kvmerge_mathqa' in tasks)"
    )
    on = subprocess.run([sys.executable, "-S", "-c", probe, "on", str(tmp_path)], capture_output=True, text=True)
    assert on.returncode == 0, on.stderr[-2000:]
    assert on.stdout.split() == ["KVMergeLM", "True", "True"]
    off = subprocess.run([sys.executable, "-S", "-c", probe, "off", str(tmp_path)], capture_output=True, text=True)
    assert off.returncode != 0 and "kvmerge" in off.stderr, off.stderr[-2000:]


@pytest.mark.integration
@needs_data
def test_copa_through_lm_eval_cli_on_smollm2(tmp_path):
    """The issue's literal command: lm-eval's own ``lm_eval`` executable from the project's environment."""
    executable = Path(sys.executable).with_name("lm_eval")
    hook = Path(sysconfig.get_paths()["purelib"]) / lm_eval_hook.PTH_NAME
    assert executable.exists() and hook.exists(), "build the environment with 'make install' (it installs the hook)"
    command = [
        str(executable), "--model", "kvmerge",
        "--model_args", "pretrained=default,method=h2o+cam,budget=0.2,seed=0",
        "--tasks", "kvmerge_copa", "--limit", "8", "--batch_size", "16", "--output_path", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=os.environ | {"KVMERGE_DATA": str(DATA)}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|kvmerge_copa|" in done.stdout
    (path,) = tmp_path.rglob("results_*.json")
    acc = json.loads(path.read_text())["results"]["kvmerge_copa"]["acc,none"]
    assert acc in {i / 8 for i in range(9)}


def test_budget_below_the_sinks_shrinks_them(tiny):
    lm = lm_of(tiny, "streaming", budget=0.2, chunk=1)
    requests = tokenized(lm)
    assert lm.cache_overrides(10) == {"sink": 2} and lm.cache_overrides(20) == {}
    batched = [s for s, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)]
    alone = [lm._loglikelihood_tokens([r], disable_tqdm=True)[0][0] for r in requests]
    assert batched == pytest.approx(alone, abs=1e-4)


def test_rolling_and_generate_until(tiny):
    from lm_eval.api.instance import Instance

    text = "The quick brown fox jumps over the lazy dog."
    full, roomy = lm_of(tiny, "full"), lm_of(tiny, "h2o+cam", budget=10_000)
    rolling = Instance("loglikelihood_rolling", {}, (text,), 0)
    ids = [full.prefix_token_id, *full.tok_encode(text)]
    expected = float(plain_logprobs(tiny[0], ids).sum())
    assert full.loglikelihood_rolling([rolling], disable_tqdm=True) == pytest.approx([expected], abs=1e-3)
    assert roomy.loglikelihood_rolling([rolling], disable_tqdm=True) == pytest.approx([expected], abs=1e-3)
    request = Instance("generate_until", {}, (text, {"until": ["zzz"], "max_gen_toks": 5}), 0)
    (generated,) = lm_of(tiny, "streaming", budget=0.5).generate_until([request], disable_tqdm=True)
    with torch.no_grad():
        out = tiny[0].generate(torch.tensor([full.tok_encode(text)]), max_new_tokens=5, do_sample=False)
    plain = tiny[1].decode(out[0, len(full.tok_encode(text)) :], skip_special_tokens=True)
    assert isinstance(generated, str) and len(plain) > 0
    (generated_full,) = full.generate_until([request], disable_tqdm=True)
    assert generated_full == plain.split("zzz")[0]


GROWTH_SELECTORS = ["streaming", "h2o", "scissorhands", "tova"]


def test_merged_values_stay_bounded_on_a_long_stream(tiny, tmp_path):
    """CaM as shipped keeps every layer's largest value norm within 1.5x of the selector alone's; the paper's
    rule (Eq. 14), which merges into long-lived entries step after step, does not (so the check can fail)."""
    from kvmerge.absorbers.cam import PAPER_RULE
    from kvmerge.eval.growth import growth_ratios, run_growth

    text = " ".join(f"Sentence {i} says that the number {i * 7 % 13} is here." for i in range(300))
    methods = [m for s in GROWTH_SELECTORS for m in (s, f"{s}+cam")]
    shipped = run_growth(*tiny, text, methods, 16, tokens=800, chunk=1, every=400, out_dir=tmp_path,
                         progress=False)  # fmt: skip
    worst = {m: max(r["growth"] for r in growth_ratios(shipped) if r["method"] == m) for m in methods if "+" in m}
    assert set(worst) == {f"{s}+cam" for s in GROWTH_SELECTORS}
    assert all(g <= 1.5 for g in worst.values()), worst
    mean = run_growth(*tiny, text, ["tova", "tova+cam"], 16, tokens=800, chunk=1, every=400,
                      options=PAPER_RULE, progress=False)  # fmt: skip
    assert max(r["growth"] for r in growth_ratios(mean)) > 1.5
    payload = read_results(tmp_path)
    assert payload["config"]["settings"]["tova+cam"]["normalizer"] == "max"
    assert "growth" in (tmp_path / "results.md").read_text() and (tmp_path / "growth.png").is_file()
