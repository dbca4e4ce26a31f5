"""One compressed context, many questions.

:func:`ask` compresses a long context once, with any method and schedule, then answers every question
from a fork of the compressed cache (:meth:`~kvmerge.cache.KVMergeCache.fork`): the forks stop
compressing, so the questions and the answers are kept whole, and the questions that share the
context run as one batch, left-padded after it. Each answer is the one that compressing the context
alone and asking that single question gives.

:class:`KVMergePipeline` is the same in the transformers style, registered as the task
``"kvmerge-qa"`` when kvmerge is imported::

    pipe = transformers.pipeline("kvmerge-qa", model=model, tokenizer=tokenizer)
    pipe(context, questions=["Who?", "When?"], method="h2o+cam", budget=0.2)["answers"]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Pipeline, PreTrainedModel
from transformers.pipelines import PIPELINE_REGISTRY

import kvmerge
from kvmerge.compat import with_cache

TASK = "kvmerge-qa"
_MARK = "\x00kvmerge-question\x00"  # where the question goes in the chat template
SEPARATOR = "\n\n"  # between the context and each question


def check_inputs(context: str, questions: Sequence[str]) -> None:
    """Refuse an empty context, no question or an empty one (before any model is loaded)."""
    if not context.strip():
        raise ValueError("the context is empty: give the text the questions are about")
    if not questions or any(not question.strip() for question in questions):
        raise ValueError("give at least one question, none of them empty")


def encode(tokenizer, context: str, questions: Sequence[str], chat: bool = True) -> tuple[list[int], list[list[int]]]:
    """Token ids of the context part and of each question part of the prompt ``context + SEPARATOR +
    question``. With ``chat`` and a chat template, the prompt is the user turn: the context part is
    everything up to the end of the context, each question part the rest (the question, the end of the
    turn and the assistant's header); otherwise the plain text, with the question on its own line."""
    check_inputs(context, questions)
    if chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": context + _MARK}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        head, tail = prompt.split(_MARK)
        context_ids = tokenizer(head, add_special_tokens=False).input_ids
    else:
        tail = "\n"
        context_ids = tokenizer(context).input_ids
    parts = [tokenizer(SEPARATOR + question + tail, add_special_tokens=False).input_ids for question in questions]
    return context_ids, parts


def compress_context(model: PreTrainedModel, context_ids: list[int], method: str, budget, **options):
    """A cache of ``method`` holding the context ``[n]`` ids compressed (a float budget is a fraction of it)."""
    cache = kvmerge.make_cache(model, method, budget, **options)
    ids = torch.tensor([context_ids], device=model.device)
    with torch.inference_mode():
        model(ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    return cache


def answer_batch(
    model: PreTrainedModel,
    tokenizer,
    cache: kvmerge.KVMergeCache,
    context_ids: list[int],
    questions: Sequence[list[int]],
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers to ``questions`` (token ids) about the context ``cache`` holds, as one batch: each
    question left-padded after the context, on a fork of ``cache`` (left as it is)."""
    fork = cache.fork(len(questions))
    longest = max(map(len, questions))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(questions), len(context_ids) + longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, : len(context_ids)] = torch.tensor(context_ids)
    mask[:, : len(context_ids)] = 1
    for row, question in enumerate(questions):
        ids[row, ids.shape[1] - len(question) :] = torch.tensor(question)
        mask[row, ids.shape[1] - len(question) :] = 1
    with torch.inference_mode():
        output = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            **with_cache(model, fork),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return [text.strip() for text in tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)]


def answer_questions(
    model: PreTrainedModel,
    tokenizer,
    cache: kvmerge.KVMergeCache,
    context_ids: list[int],
    question_ids: Sequence[list[int]],
    max_new_tokens: int = 64,
    batch_size: int | None = None,
) -> list[str]:
    """Greedy answers to ``question_ids`` about the context ``cache`` holds (left as it is), ``batch_size``
    questions per batch (all at once by default)."""
    if max_new_tokens < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError("max_new_tokens and batch_size must be positive counts")
    size = batch_size or len(question_ids)
    return [
        answer
        for start in range(0, len(question_ids), size)
        for answer in answer_batch(
            model, tokenizer, cache, context_ids, question_ids[start : start + size], max_new_tokens
        )
    ]


def ask(
    model: PreTrainedModel,
    tokenizer,
    context: str,
    questions: Sequence[str],
    method: str = "full",
    budget: int | float | None = None,
    *,
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    chat: bool = True,
    **options,
) -> list[str]:
    """Compress ``context`` once with ``method`` (``budget``: entries per KV head, or a fraction of the
    context) and answer each of ``questions`` from it, greedily, ``batch_size`` questions at a time (all
    at once by default). ``options`` go to :func:`kvmerge.make_cache`; ``chat`` applies the tokenizer's
    chat template (see :func:`encode`). Everything is validated before any compute."""
    kvmerge.make_method(method, budget, **options)
    context_ids, question_ids = encode(tokenizer, context, questions, chat)
    cache = compress_context(model, context_ids, method, budget, **options)
    return answer_questions(model, tokenizer, cache, context_ids, question_ids, max_new_tokens, batch_size)


def answer_file(
    context_file: Path, questions: Sequence[str], method: str, budget, model_name: str, options: dict
) -> Callable[..., dict]:
    """``kvmerge ask``: read and check the context file and the questions, load the model (every user
    error raised here, before any compute), then return the run: ``run(max_new_tokens, batch_size,
    chat)`` compresses the context, answers, and returns the answers with the context's size, the KV
    bytes held against a full cache's and the seconds of both phases."""
    context = context_file.read_text(encoding="utf-8")
    check_inputs(context, questions)
    model, tokenizer = kvmerge.load_model(model_name)

    def run(max_new_tokens: int, batch_size: int | None, chat: bool = True) -> dict:
        context_ids, question_ids = encode(tokenizer, context, questions, chat)
        start = time.perf_counter()
        cache = compress_context(model, context_ids, method, budget, **options)
        compressed = time.perf_counter()
        answers = answer_questions(model, tokenizer, cache, context_ids, question_ids, max_new_tokens, batch_size)
        return {
            "method": method,
            "budget": budget,
            "context_tokens": len(context_ids),
            "kept_per_head": cache.kept_tokens(),
            "kv_bytes": cache.kv_bytes(),
            "kv_bytes_full": cache.kv_bytes_full(),
            "compress_seconds": round(compressed - start, 3),
            "answer_seconds": round(time.perf_counter() - compressed, 3),
            "answers": [{"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)],
        }

    return run


class KVMergePipeline(Pipeline):
    """``pipe(context, questions=[...] or question="...", method=..., budget=..., max_new_tokens=...,
    batch_size=..., chat=..., **method options)`` -> ``{"answers": [...]}`` (``{"answer": ...}`` for one
    ``question``): :func:`ask` as a transformers pipeline."""

    def _sanitize_parameters(self, question=None, questions=None, chat=None, **kwargs):
        preprocess = {"question": question, "questions": questions} if question or questions else {}
        if chat is not None:
            preprocess["chat"] = chat
        postprocess = {"single": question is not None} if preprocess else {}
        return preprocess, kwargs, postprocess

    def preprocess(self, context: str, question: str | None = None, questions=None, chat: bool = True) -> dict:
        if (question is None) == (questions is None):
            raise ValueError(f"{TASK}: give either question='...' or questions=[...]")
        asked = [question] if question is not None else list(questions)
        context_ids, question_ids = encode(self.tokenizer, context, asked, chat)
        return {"context_ids": context_ids, "question_ids": question_ids}

    def _forward(
        self,
        inputs: dict,
        method: str = "full",
        budget: int | float | None = None,
        max_new_tokens: int = 64,
        batch_size: int | None = None,
        **options,
    ) -> dict:
        context_ids, question_ids = inputs["context_ids"], inputs["question_ids"]
        cache = compress_context(self.model, context_ids, method, budget, **options)
        answers = answer_questions(
            self.model, self.tokenizer, cache, context_ids, question_ids, max_new_tokens, batch_size
        )
        return {"answers": answers}

    def postprocess(self, outputs: dict, single: bool = False) -> dict:
        return {"answer": outputs["answers"][0]} if single else outputs


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=KVMergePipeline, pt_model=AutoModelForCausalLM)
