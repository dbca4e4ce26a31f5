"""Prompt logic of lm-eval's own copa, winogrande and mathqa tasks, and the local-data loader."""

from __future__ import annotations

import re

import datasets

from kvmerge.eval import local


def load_local(file: str, split: str, data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """A ``DatasetDict`` with one ``split`` read from ``file`` under the data folder.

    lm-eval calls this with the task's ``dataset_kwargs`` plus its metadata (the model arguments
    and ``--metadata``): ``--metadata '{"data_dir": "/path/to/data"}'`` overrides ``$KVMERGE_DATA``.
    OpenBookQA's original release format is mapped to the HF fields lm-eval's prompts use.
    """
    records = local.read_jsonl(local.data_dir(data_dir) / file)
    if file.startswith("openbookqa"):
        records = [_openbookqa_hf(record) for record in records]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})


def _openbookqa_hf(record: dict) -> dict:
    choices = record["question"]["choices"]
    return {
        "id": record["id"],
        "question_stem": record["question"]["stem"],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": record["answerKey"],
    }


# lm_eval/tasks/super_glue/copa/utils.py
def copa_doc_to_text(doc: dict) -> str:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"


def _lower_first(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def copa_doc_to_choice(doc: dict) -> list[str]:
    return [" " + _lower_first(doc["choice1"]), " " + _lower_first(doc["choice2"])]


# lm_eval/tasks/winogrande/preprocess_winogrande.py (partial evaluation: one context per option)
def winogrande_doc_to_text(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


# lm_eval/tasks/mathqa/utils.py
def mathqa_doc_to_choice(doc: dict) -> list[str]:
    return [c[4:].rstrip(" ,") for c in re.findall(r"[abcd] \) .*?, |e \) .*?$", doc["options"])]
