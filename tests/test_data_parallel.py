"""lm-eval's data-parallel path on this CPU (issue 19): two processes under torchrun (the launcher
``accelerate launch`` wraps; on a CPU accelerate joins them with gloo) each score a shard of the
documents, and lm-eval gathers exactly what one process computes alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["--model", "kvmerge", "--tasks", "kvmerge_copa,kvmerge_rte", "--limit", "12", "--batch_size", "4"]


def evaluate(tiny_dir: Path, out: Path, processes: int) -> tuple[dict, dict]:
    """Accuracy per task and per-document log-likelihoods (by task and document) of one lm-eval run."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command = [
        *(launcher if processes > 1 else [sys.executable]),
        "-m",
        "kvmerge.eval.harness",
        *ARGS,
        "--model_args",
        f"pretrained={tiny_dir},method=h2o+cam,budget=0.5",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    accuracy = {task: value["acc,none"] for task, value in json.loads(results.read_text())["results"].items()}
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            scores = [float(score) for ((score, _greedy),) in sample["resps"]]
            samples[(path.name.split("_")[2], sample["doc_id"])] = scores
    return accuracy, samples


def test_two_processes_give_exactly_the_accuracies_of_one(tiny_dir, tmp_path):
    accuracy, scores = evaluate(tiny_dir, tmp_path / "one", 1)
    sharded_accuracy, sharded_scores = evaluate(tiny_dir, tmp_path / "two", 2)
    assert sharded_accuracy == accuracy and set(accuracy) == {"kvmerge_copa", "kvmerge_rte"}
    # every document scored once; the shards' batches pad differently, which moves scores by float rounding only
    assert sharded_scores.keys() == scores.keys() and len(scores) == 24
    for key, values in scores.items():
        assert sharded_scores[key] == pytest.approx(values, abs=1e-3), key
