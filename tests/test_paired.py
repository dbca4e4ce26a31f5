"""Paired bootstrap intervals on hand-made outcomes, and the QA table's pairing of +absorber with its selector."""

from __future__ import annotations

import pytest

from kvmerge.eval import qa
from kvmerge.eval.paired import paired_bootstrap


def test_identical_outcomes_differ_by_exactly_zero():
    outcomes = [1, 0, 1, 1, 0] * 20
    assert paired_bootstrap(outcomes, outcomes) == {"diff": 0.0, "low": 0.0, "high": 0.0, "n": 100,
                                                   "excludes_zero": False}  # fmt: skip


def test_a_constant_gain_has_a_point_interval_that_excludes_zero():
    result = paired_bootstrap([0] * 50, [1] * 50)
    assert (result["diff"], result["low"], result["high"], result["excludes_zero"]) == (1.0, 1.0, 1.0, True)


def test_the_interval_covers_the_mean_and_shrinks_with_more_examples():
    small = paired_bootstrap([0, 0, 0, 0, 1] * 8, [1, 0, 0, 0, 1] * 8)  # +1 in 8 of 40 examples: +0.2
    large = paired_bootstrap([0, 0, 0, 0, 1] * 80, [1, 0, 0, 0, 1] * 80)
    assert small["diff"] == pytest.approx(0.2) == large["diff"]
    assert small["low"] < 0.2 < small["high"] and large["low"] < 0.2 < large["high"]
    assert large["high"] - large["low"] < 0.5 * (small["high"] - small["low"])  # ~ 1/sqrt(10)
    assert large["excludes_zero"]


def test_mixed_outcomes_that_cancel_do_not_exclude_zero_and_are_reproducible():
    a, b = [1, 0] * 30, [0, 1] * 30  # every example changes, half each way
    first = paired_bootstrap(a, b)
    assert first["diff"] == 0.0 and first["low"] < 0 < first["high"] and not first["excludes_zero"]
    assert paired_bootstrap(a, b) == first


def test_outcomes_must_pair():
    with pytest.raises(ValueError, match="the same examples: got 3 and 2"):
        paired_bootstrap([1, 0, 1], [1, 0])


def test_qa_pairs_each_absorber_with_its_selector_and_marks_clear_differences():
    def record(method, outcomes, task="copa"):
        return {"method": method, "budget": 0.2, "seed": 0, "task": task, "acc": sum(outcomes) / len(outcomes),
                "n": len(outcomes), "outcomes": outcomes, "seconds": 1.0}  # fmt: skip

    records = [record("h2o", [0] * 40), record("h2o+cam", [1] * 40), record("streaming", [1, 0] * 20),
               record("streaming+cam", [0, 1] * 20)]  # fmt: skip
    pairs = {d["method"]: d for d in qa.paired_differences(records)}
    assert set(pairs) == {"h2o+cam", "streaming+cam"} and pairs["h2o+cam"]["versus"] == "h2o"
    assert pairs["h2o+cam"]["excludes_zero"] and not pairs["streaming+cam"]["excludes_zero"]


def test_qa_table_shows_documents_and_stars_clear_differences(tmp_path):
    def record(method, outcomes):
        return {"method": method, "budget": 0.2, "seed": 0, "task": "copa", "acc": sum(outcomes) / len(outcomes),
                "n": len(outcomes), "outcomes": outcomes, "seconds": 1.0}  # fmt: skip

    payload = {"config": {}, "records": [record("h2o", [0, 1] * 20), record("h2o+cam", [1] * 40)]}
    text = qa.render(payload, tmp_path)
    assert "| h2o | 0.2 | 50.0 (40) | 50.0 |" in text and "| h2o+cam | 0.2 | 100.0 (40)* | 100.0 |" in text
    assert "| copa | h2o+cam vs h2o | 0.2 | 0 | +50.0 [" in text and (tmp_path / "qa.png").is_file()
