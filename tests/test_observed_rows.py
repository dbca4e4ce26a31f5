"""A step computes attention probabilities only for the query rows its method reads
(``Method.observed_rows``) and attends the others with SDPA; each block of rows sees only the entries
before its last token. Oracle: the same run with every row computed explicitly over every entry (the
path before this split), which must give the same logits, statistics and kept entries."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvmerge
from kvmerge import cache as cache_module
from kvmerge.method import Method
from tests.conftest import VOCAB, tiny_model


@pytest.mark.parametrize(
    ("method", "options", "rows"),
    [
        ("streaming", {}, 0),
        ("random", {}, 0),
        ("tova", {}, 1),
        ("snapkv", {"window": 6}, 6),
        ("scissorhands", {"history_window": 5}, 5),
        ("corm", {"window": 7}, 7),
        ("h2o", {}, None),
        ("streaming+cam", {}, None),
        ("tova+cam", {}, None),  # Ā for the merge: every row
    ],
)
def test_observed_rows_are_what_the_statistics_read(method, options, rows):
    assert kvmerge.make_method(method, 16, **options).observed_rows == rows


def _run(model, ids, mask, method, budget, options, every_row: bool, monkeypatch):
    """Logits of ``ids`` in two forward calls (the prompt, then 3 tokens one at a time) and the first layer's
    cache; ``every_row`` computes every row's probabilities over every entry (the reference path)."""
    with monkeypatch.context() as patch:
        if every_row:
            patch.setattr(Method, "observed_rows", property(lambda self: None if self.needs_attention else 0))
            patch.setattr(cache_module, "_BLOCK_ROWS", 1 << 30)
        cache = kvmerge.make_cache(model, method, budget, **options)
        logits = []
        with torch.no_grad():
            prompt = ids.shape[1] - 3
            out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], **kvmerge.with_cache(model, cache))
            logits.append(out.logits)
            for t in range(prompt, ids.shape[1]):
                out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **kvmerge.with_cache(model, cache))
                logits.append(out.logits)
    return torch.cat(logits, dim=1), cache.layers[0]


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("tova", {"schedule": "prefill"}),
        ("tova", {"chunk_size": 8}),
        ("snapkv", {"window": 6}),
        ("scissorhands", {"chunk_size": 12, "history_window": 5}),
        ("corm", {"chunk_size": 8, "window": 4}),
        ("h2o", {"schedule": "prefill"}),
        ("h2o+cam", {"chunk_size": 8}),
        ("streaming", {"schedule": "prefill"}),
        ("streaming", {"chunk_size": 8}),
    ],
)
@pytest.mark.parametrize("padded", [False, True])
def test_split_attention_equals_every_row_explicitly(monkeypatch, method, options, padded):
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 300), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :37] = 0  # left padding of the second sequence
    expected, reference = _run(model, ids, mask, method, 40, options, True, monkeypatch)
    actual, layer = _run(model, ids, mask, method, 40, options, False, monkeypatch)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(layer.index, reference.index)  # the same entries kept
    for name, value in layer.stats.items():
        torch.testing.assert_close(value, reference.stats[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["streaming", "tova", "snapkv"])
def test_prefill_schedule_attends_the_prompt_as_the_full_cache(method):
    """Methods that read the probabilities of a few rows only attend the prompt with the full cache's SDPA:
    the prompt's logits are the full cache's, bit for bit."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, **kvmerge.with_cache(model, DynamicCache(config=model.config))).logits
        cache = kvmerge.make_cache(model, method, 50, schedule="prefill")
        logits = model(ids, **kvmerge.with_cache(model, cache)).logits
    assert cache.kept_tokens() == 50 and cache.layers[0].compressions == 1
    assert torch.equal(logits, full)
