"""One compressed context, many questions (issue 18): a fork of a cache is independent of it and
continues exactly as it would; a cache that stopped compressing keeps every new token; questions
batched on forks of one compressed context get, each, what compressing the context alone and asking
that one question gives (logits and greedy answers); the pipeline and ``kvmerge ask``."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import kvmerge
from kvmerge.cli import main
from kvmerge.pipeline import TASK, answer_questions, ask, compress_context, encode
from tests.conftest import VOCAB, tiny_model


def held(cache: kvmerge.KVMergeCache) -> list[dict[str, torch.Tensor]]:
    """Every layer's per-entry tensors and absorber state, copied."""
    return [
        {name: t.clone() for name, t in {**layer._named(layer.entries), **layer.absorber_state}.items()}
        for layer in cache.layers
    ]


@pytest.mark.parametrize("method", ["streaming", "h2o+cam", "tova", "scissorhands"])
def test_a_fork_leaves_the_cache_as_it_is_and_continues_as_it_would(method):
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 50), generator=torch.Generator().manual_seed(1))
    cache = kvmerge.make_cache(model, method, 12, chunk_size=4)
    calls = [(30, 35), *((t, t + 1) for t in range(35, 50))]
    with torch.no_grad():
        model(ids[:, :30], **kvmerge.with_cache(model, cache))
        before = held(cache)
        fork = cache.fork(compressing=True)
        forked = [model(ids[:, s:e], **kvmerge.with_cache(model, fork)).logits for s, e in calls]
        for layer, saved in zip(cache.layers, before, strict=True):  # the fork wrote nothing into the cache
            for name, tensor in {**layer._named(layer.entries), **layer.absorber_state}.items():
                assert torch.equal(tensor, saved[name]), name
        original = [model(ids[:, s:e], **kvmerge.with_cache(model, cache)).logits for s, e in calls]
    for a, b in zip(forked, original, strict=True):
        assert torch.equal(a, b)
    assert fork.get_seq_length() == cache.get_seq_length() == 50 and fork.kept_tokens() == 12


def test_fork_copies_repeat_each_sequence():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    cache = kvmerge.make_cache(model, "h2o", 10)
    with torch.no_grad():
        model(ids, **kvmerge.with_cache(model, cache))
    fork = cache.fork(3)
    for layer, twin in zip(cache.layers, fork.layers, strict=True):
        for name, tensor in layer._named(layer.entries).items():
            assert torch.equal(twin._named(twin.entries)[name], tensor.repeat_interleave(3, dim=0)), name
        assert torch.equal(twin.valid_seen, layer.valid_seen.repeat_interleave(3))
    with pytest.raises(ValueError, match="positive count"):
        cache.fork(0)


def test_a_cache_that_stopped_compressing_keeps_every_new_token():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(3))
    cache = kvmerge.make_cache(model, "h2o+cam", 12)
    with torch.no_grad():
        model(ids[:, :30], **kvmerge.with_cache(model, cache))
        cache.stop_compressing()
        model(ids[:, 30:40], **kvmerge.with_cache(model, cache))
        for t in range(40, 60):
            model(ids[:, t : t + 1], **kvmerge.with_cache(model, cache))
    assert cache.kept_tokens() == 12 + 30
    layer = cache.layers[0]
    assert layer._buffers["keys"].shape[2] > layer.keys.shape[2]  # grown with room, not one step at a time
    assert sorted(layer.index[0, 0].tolist())[-30:] == list(range(30, 60))


def question_logits(model, cache, context: torch.Tensor, questions: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of each question's tokens ``[q_i, vocab]`` asked as one left-padded batch on a fork of ``cache``
    (which keeps them all)."""
    longest = max(len(q) for q in questions)
    ids = torch.zeros(len(questions), longest, dtype=torch.long)
    mask = torch.zeros(len(questions), context.shape[-1] + longest, dtype=torch.long)
    mask[:, : context.shape[-1]] = 1
    for row, question in enumerate(questions):
        ids[row, longest - len(question) :] = question
        mask[row, mask.shape[1] - len(question) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, context.shape[-1] :]
    fork = cache.fork(len(questions))
    logits = model(ids, attention_mask=mask, position_ids=positions, **kvmerge.with_cache(model, fork)).logits
    assert fork.kept_tokens() == cache.kept_tokens() + longest
    return [logits[row, longest - len(q) :] for row, q in enumerate(questions)]


@pytest.mark.parametrize("method", ["streaming", "h2o+cam", "tova", "snapkv", "scissorhands+cam"])
def test_batched_questions_equal_each_question_asked_alone(method):
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(4)
    context = torch.randint(0, VOCAB, (1, 40), generator=generator)
    questions = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (5, 9, 7)]
    with torch.no_grad():
        cache = kvmerge.make_cache(model, method, 0.3)
        model(context, **kvmerge.with_cache(model, cache))
        batched = question_logits(model, cache, context, questions)
        for question, logits in zip(questions, batched, strict=True):
            alone = kvmerge.make_cache(model, method, 0.3)
            model(context, **kvmerge.with_cache(model, alone))
            alone.stop_compressing()
            expected = model(question[None], **kvmerge.with_cache(model, alone)).logits[0]
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
            assert alone.kept_tokens() == 12 + len(question)


def answer_alone(model, tokenizer, context: str, question: str, method: str, budget, tokens: int) -> str:
    """The greedy answer of compressing ``context`` alone and asking ``question`` on that cache."""
    context_ids, (question_ids,) = encode(tokenizer, context, [question])
    cache = compress_context(model, context_ids, method, budget)
    cache.stop_compressing()
    ids = torch.tensor([context_ids + question_ids])
    with torch.no_grad():
        output = model.generate(ids, **kvmerge.with_cache(model, cache), max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()


CONTEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want"
QUESTIONS = ["Who?", "What does he want, and why?", "Is it true?"]


@pytest.mark.parametrize("method, budget", [("h2o+cam", 0.25), ("streaming", 16), ("snapkv", 0.3), ("full", None)])
def test_ask_answers_each_question_as_asked_alone(tiny_dir, method, budget):
    model, tokenizer = kvmerge.load_model(str(tiny_dir))
    answers = ask(model, tokenizer, CONTEXT, QUESTIONS, method, budget, max_new_tokens=12)
    assert answers == [answer_alone(model, tokenizer, CONTEXT, q, method, budget, 12) for q in QUESTIONS]
    assert len(set(answers)) > 1  # the answers depend on the question
    assert ask(model, tokenizer, CONTEXT, QUESTIONS, method, budget, max_new_tokens=12, batch_size=2) == answers


def test_ask_refuses_bad_input_before_any_compute(tiny_dir):
    model, tokenizer = kvmerge.load_model(str(tiny_dir))
    with pytest.raises(ValueError, match="unknown selector"):
        ask(model, tokenizer, CONTEXT, QUESTIONS, "nope", 0.2)
    with pytest.raises(ValueError, match="context is empty"):
        ask(model, tokenizer, "  ", QUESTIONS, "h2o", 0.2)
    with pytest.raises(ValueError, match="at least one question"):
        ask(model, tokenizer, CONTEXT, [], "h2o", 0.2)
    with pytest.raises(ValueError, match="positive counts"):
        answer_questions(model, tokenizer, None, [1], [[1]], max_new_tokens=0)


def test_the_transformers_pipeline(tiny_dir):
    model, tokenizer = kvmerge.load_model(str(tiny_dir))
    pipe = transformers.pipeline(TASK, model=model, tokenizer=tokenizer)
    expected = ask(model, tokenizer, CONTEXT, QUESTIONS, "h2o+cam", 0.25, max_new_tokens=8)
    out = pipe(CONTEXT, questions=QUESTIONS, method="h2o+cam", budget=0.25, max_new_tokens=8)
    assert out == {"answers": expected}
    one = pipe(CONTEXT, question=QUESTIONS[1], method="h2o+cam", budget=0.25, max_new_tokens=8)
    assert one == {"answer": expected[1]}
    with pytest.raises(ValueError, match="either question"):
        pipe(CONTEXT, method="h2o", budget=0.25)


def test_ask_command(capsys, tiny_dir, tmp_path):
    context = tmp_path / "context.txt"
    context.write_text(CONTEXT)
    argv = ["ask", "--model", str(tiny_dir), "--context", str(context), "--method", "h2o+cam", "--budget", "0.25"]
    questions = [arg for q in QUESTIONS for arg in ("--question", q)]
    assert main([*argv, *questions, "--max-new-tokens", "8", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    model, tokenizer = kvmerge.load_model(str(tiny_dir))
    expected = ask(model, tokenizer, CONTEXT, QUESTIONS, "h2o+cam", 0.25, max_new_tokens=8)
    assert [a["answer"] for a in record["answers"]] == expected
    assert record["kv_bytes"] < record["kv_bytes_full"] and record["kept_per_head"] < record["context_tokens"]
    assert main([*argv, *questions[:2], "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"Q: {QUESTIONS[0]}\nA: ") and "compressed to" in out.err
    assert main([*argv[:-4], "--method", "h2o", "--budget", "0.25", "--question", " "]) == 2
    assert capsys.readouterr().err.strip() == "kvmerge: error: give at least one question, none of them empty"
    missing = ["ask", "--context", str(tmp_path / "none.txt"), "--method", "h2o", "--budget", "0.2", "--question", "a"]
    assert main(missing) == 2
    assert "No such file" in capsys.readouterr().err
