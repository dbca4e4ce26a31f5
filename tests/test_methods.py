"""Each method against its definition in METHODS.md, on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

import kvmerge
from kvmerge.absorbers.cam import PAPER_RULE, merge_gate, merge_probability
from kvmerge.cache import KVMergeLayer
from kvmerge.config import CompressionConfig
from kvmerge.registry import build_method
from kvmerge.rng import hashed_uniform, head_keys, uniform_at
from kvmerge.stats import (
    AccumulatedAttention,
    AttentionHistory,
    CurrentAttention,
    Observation,
    ObservationWindowAttention,
)
from tests.conftest import VOCAB

DIM = 4
PAPER = PAPER_RULE


def hand_made_layer(method: str, budget: int, positions: int, stats: dict, heads: int = 2, **options):
    """A layer holding ``positions`` entries (positions 0..n-1) per head with the given statistics."""
    layer = KVMergeLayer(kvmerge.make_method(method, budget, **options), layer_idx=0)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, heads, positions, DIM, generator=generator)
    values = torch.randn(1, heads, positions, DIM, generator=generator)
    layer.lazy_initialization(keys[:, :, :0], values[:, :, :0])
    layer.keys, layer.values = keys, values
    layer.index = torch.arange(positions).expand(1, heads, positions).clone()
    layer.stats = {name: value.clone() for name, value in stats.items()}
    layer.valid_seen = torch.tensor([positions])
    layer.seen = positions
    layer.set_budgets(torch.tensor([positions]))
    return layer


def kept_positions(layer: KVMergeLayer) -> list[list[int]]:
    return [sorted(row[row >= 0].tolist()) for row in layer.index[0]]


def test_streaming_keeps_sinks_and_most_recent(llama):
    ids = torch.randint(0, VOCAB, (1, 50), generator=torch.Generator().manual_seed(0))
    cache = kvmerge.make_cache(llama, "streaming", budget=12, chunk_size=1)
    with torch.no_grad():
        llama(ids, **kvmerge.with_cache(llama, cache))
    expected = [0, 1, 2, 3, *range(42, 50)]
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 12  # real eviction: the tensors shrank
        assert kept_positions(layer) == [expected] * layer.index.shape[1]


def test_h2o_keeps_heaviest_plus_recent_window():
    acc = torch.tensor(
        [[[5.0, 0.1, 3.0, 0.2, 4.0, 0.3, 0.0, 9.0, 9.0, 9.0], [0.1, 7.0, 0.2, 6.0, 0.3, 5.0, 0.0, 0.0, 0.0, 0.0]]]
    )
    layer = hand_made_layer("h2o", budget=6, positions=10, stats={AccumulatedAttention.name: acc})
    layer.compress()
    # recent window = 3 (positions 7-9), heavy = the 3 largest Ā among 0-6, per head
    assert kept_positions(layer) == [[0, 2, 4, 7, 8, 9], [1, 3, 5, 7, 8, 9]]
    assert layer.keys.shape == (1, 2, 6, DIM)


def test_tova_keeps_largest_current_attention_without_windows():
    current = torch.tensor([[0.30, 0.05, 0.20, 0.01, 0.10, 0.02, 0.25, 0.07]]).expand(1, 2, 8)
    layer = hand_made_layer("tova", budget=3, positions=8, stats={CurrentAttention.name: current})
    layer.compress()
    assert kept_positions(layer) == [[0, 2, 6], [0, 2, 6]]


def test_scissorhands_evicts_most_often_unimportant():
    history = torch.tensor(
        [[[0b1111, 0b0001, 0b0111, 0b0000, 0b0011, 0, 0, 0], [0b0000, 0b1111, 0b0001, 0b0111, 0b0011, 0, 0, 0]]]
    )
    layer = hand_made_layer(
        "scissorhands", budget=6, positions=8, stats={"low_attention_history": history}, history_window=4
    )
    layer.compress()  # recent = 3 (5-7); keep the 3 lowest counts among 0-4
    assert kept_positions(layer) == [[1, 3, 4, 5, 6, 7], [0, 2, 4, 5, 6, 7]]


def test_statistics_update_from_hand_made_attention():
    probs = torch.tensor([[[[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], [[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]]]]])  # [1,1,2,2,3]
    visible = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    seen = Observation(probs, visible, torch.tensor([[0, 1]]), torch.tensor([3]))

    def fresh() -> torch.Tensor:
        return torch.zeros(1, 1, 3)

    torch.testing.assert_close(AccumulatedAttention("mean").update(fresh(), seen), torch.tensor([[[0.8, 0.45, 0.75]]]))
    torch.testing.assert_close(AccumulatedAttention("max").update(fresh(), seen), torch.tensor([[[1.0, 0.6, 1.0]]]))
    torch.testing.assert_close(AccumulatedAttention("sum").update(fresh(), seen), torch.tensor([[[1.6, 0.9, 1.5]]]))
    torch.testing.assert_close(CurrentAttention().update(fresh(), seen), torch.tensor([[[0.2, 0.2, 0.6]]]))
    value = fresh()  # the cache owns the value: updated in place
    assert AccumulatedAttention("mean").update(value, seen) is value and float(value.sum()) > 0
    # mean probs: row 0 = [0.6, 0.25, 0.15], row 1 = [0.2, 0.2, 0.6]; uniform 1/3; older row is the higher bit
    history = AttentionHistory(window=3, gqa="mean").update(torch.zeros(1, 1, 3, dtype=torch.long), seen)
    assert history.tolist() == [[[0b01, 0b11, 0b10]]]
    assert AttentionHistory.count(torch.tensor([0b1011, 0]), 4).tolist() == [3, 0]
    # the window forgets: shifting 3 more rows with window 3 keeps only them
    again = AttentionHistory(window=2, gqa="mean").update(torch.tensor([[[0b11, 0b11, 0b11]]]), seen)
    assert again.tolist() == [[[0b01, 0b11, 0b10]]]


def test_low_attention_ignores_entries_a_row_could_not_see():
    probs = torch.tensor([[[[[1.0, 0.0]]]]])
    visible = torch.tensor([[[[True, False]]]])
    history = AttentionHistory(window=4).update(
        torch.zeros(1, 1, 2, dtype=torch.long), Observation(probs, visible, torch.tensor([[1]]), torch.tensor([2]))
    )
    assert history.tolist() == [[[0, 0]]]


@pytest.mark.parametrize(
    ("evicted", "mean", "p"),
    [(0.5, 1.0, 0.5), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 1.0), (float("nan"), 1.0, 0.0), (-1.0, 1.0, 0.0)],
)
@pytest.mark.parametrize("count", [1, 3])
def test_merge_gate_is_a_draw_below_the_clamped_ratio(evicted, mean, p, count):
    # p = clamp(A_i / mean(A_N), 0, 1), with 0/0 and NaN giving 0 and x/0 giving 1
    draws = torch.tensor([0.0, 0.25, 0.4999, 0.5001, 0.75, 0.9999])
    gate = merge_gate(draws, torch.tensor(evicted), torch.tensor(mean * count), torch.tensor(count))
    assert gate.tolist() == (draws < p).tolist()


@pytest.mark.parametrize(
    ("evicted", "mean", "p"),
    [(0.5, 1.0, 0.5), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 1.0), (float("nan"), 1.0, 0.0), (-1.0, 1.0, 0.0)],
)
@pytest.mark.parametrize("count", [1, 3])
def test_merge_probability_is_the_gates_clamped_ratio(evicted, mean, p, count):
    got = merge_probability(torch.tensor([evicted]), torch.tensor([mean * count]), torch.tensor([count]))
    assert got.tolist() == pytest.approx([p])


def test_merge_gate_never_merges_without_neighbours():
    assert not merge_gate(torch.tensor([0.0, 0.5]), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0)).any()


def one_by_one(
    values: torch.Tensor, kept: list[int], m: int, weight_of, reference=None, receives=lambda k: True
) -> torch.Tensor:
    """The oracle of CaM's bulk merge for one head's ``values`` ``[n, d]``: the evictions one at a time in
    position order, each merged with ``weight_of(i, targets) / m`` into the next ``m`` entries still
    present (a later-evicted one passes on what it received); ``V_i - reference`` when centered; only
    entries that are later evicted or that ``receives`` are targets."""
    present, current = list(range(values.shape[0])), values.clone()
    for i in sorted(set(present) - set(kept)):
        targets = [k for k in [k for k in present if k > i][:m] if k not in kept or receives(k)]
        merged = current[i] - (0.0 if reference is None else reference)
        current[targets] += float(weight_of(i, targets)) * merged / m
        present.remove(i)
    return current[kept]


def clamped(ratio: torch.Tensor) -> float:
    return 0.0 if torch.isnan(ratio) else min(max(float(ratio), 0.0), 1.0)


@pytest.mark.parametrize("normalizer", ["mean", "max"])
def test_cam_merges_values_per_formula_and_never_touches_keys(normalizer):
    # 8 entries, budget 5: recent = 2 (6, 7); the 3 heaviest of 0-5 stay, so 3 entries are evicted per head.
    acc = torch.tensor([[[0.9, 0.8, 0.0, 0.7, 0.05, 0.2, 0.4, 0.4], [0.0, 0.6, 0.6, 0.3, 0.6, 0.0, 0.6, 0.6]]])
    merges = 0
    for seed in range(8):
        layer = hand_made_layer(
            "h2o+cam", 5, positions=8, stats={AccumulatedAttention.name: acc}, merge_window=2, seed=seed,
            normalizer=normalizer, gate="bernoulli", centered=False, targets="next",
        )  # fmt: skip
        keys, values = layer.keys.clone(), layer.values.clone()
        layer.compress()
        kept = kept_positions(layer)
        assert kept == [[0, 1, 3, 6, 7], [1, 2, 4, 6, 7]]
        for h in range(2):

            def gate(i, targets, h=h, kept=kept, seed=seed):
                # mean: Ā_i / mean(Ā of the targets); max: Ā_i / max(Ā of the kept entries)
                norm = acc[0, h, targets].mean() if normalizer == "mean" else acc[0, h, kept[h]].max()
                return hashed_uniform(seed, 0, torch.tensor(h), torch.tensor(i)) < clamped(acc[0, h, i] / norm)

            expected = one_by_one(values[0, h], kept[h], 2, gate)
            torch.testing.assert_close(layer.values[0, h], expected)
            torch.testing.assert_close(layer.keys[0, h], keys[0, h, kept[h]])  # keys are never merged
            merges += int(not torch.equal(expected, values[0, h, kept[h]]))
    assert merges >= 2  # something was merged


@pytest.mark.parametrize("max_over", ["kept", "windows"])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("per_step", [False, True])
def test_cam_expected_gate_merges_the_probability_per_formula(max_over, centered, per_step):
    # h2o, budget 5, recent 2: 6 and 7 are the window, 0, 1, 3 the heavy hitters kept; 2, 4, 5 are evicted
    acc = torch.tensor([[[0.9, 0.8, 0.1, 0.7, 0.05, 0.2, 0.4, 0.3], [0.2, 0.6, 0.6, 0.3, 0.6, 0.1, 0.5, 0.7]]])
    layer = hand_made_layer(
        "h2o+cam", 5, positions=8, stats={AccumulatedAttention.name: acc}, merge_window=3, gate="expected",
        max_over=max_over, centered=centered, per_step=per_step, targets="next",
    )  # fmt: skip
    values = layer.values.clone()
    layer.compress()
    kept = kept_positions(layer)
    assert kept == [[0, 1, 3, 6, 7], [1, 2, 4, 6, 7]]
    gate_on = acc / (8 - torch.arange(8)) if per_step else acc  # per step: Ā / (seen - position), seen = 8
    for h in range(2):
        over = kept[h] if max_over == "kept" else [6, 7]  # the windows: no sinks for h2o, the recent 6 and 7
        reference = (acc[0, h, :, None] * values[0, h]).sum(0) / acc[0, h].sum() if centered else None

        def weight(i, _targets, h=h, over=over):
            return clamped(gate_on[0, h, i] / gate_on[0, h, over].max())

        expected = one_by_one(values[0, h], kept[h], 3, weight, reference)
        torch.testing.assert_close(layer.values[0, h], expected)
        assert not torch.equal(expected, values[0, h, kept[h]])


@pytest.mark.parametrize("normalizer", ["mean", "max"])
def test_cam_window_targets_are_the_kept_entries_of_the_recent_window(normalizer):
    # h2o, budget 5, recent 2: 2, 4, 5 are evicted in one compression; of their next m = 3 entries only the
    # window (6, 7) and the later-evicted ones (4, 5) receive, never the kept heavy hitter 3
    acc = torch.tensor([[[0.9, 0.8, 0.1, 0.7, 0.05, 0.2, 0.4, 0.3]]])
    layer = hand_made_layer(
        "h2o+cam", 5, positions=8, stats={AccumulatedAttention.name: acc}, heads=1, merge_window=3,
        targets="window", normalizer=normalizer, centered=False,
    )  # fmt: skip
    values = layer.values.clone()
    layer.compress()
    assert kept_positions(layer) == [[0, 1, 3, 6, 7]]

    def weight(i, targets):
        norm = acc[0, 0, targets].mean() if normalizer == "mean" else acc[0, 0, [0, 1, 3, 6, 7]].max()
        return clamped(acc[0, 0, i] / norm)

    expected = one_by_one(values[0, 0], [0, 1, 3, 6, 7], 3, weight, receives=lambda k: k >= 6)
    torch.testing.assert_close(layer.values[0, 0], expected)
    torch.testing.assert_close(layer.values[0, 0, :3], values[0, 0, [0, 1, 3]])  # outside the window: untouched
    assert not torch.equal(layer.values[0, 0, 3:], values[0, 0, 6:])


def test_merge_log_counts_the_gates_passes():
    from kvmerge.absorbers.cam import MergeLog

    # as in test_cam_expected_gate_merges_the_probability_per_formula: 2, 4, 5 evicted, merged with p
    acc = torch.tensor([[[0.9, 0.8, 0.1, 0.7, 0.05, 0.2, 0.4, 0.3], [0.2, 0.6, 0.6, 0.3, 0.6, 0.1, 0.5, 0.7]]])
    layer = hand_made_layer("h2o+cam", 5, positions=8, stats={AccumulatedAttention.name: acc}, centered=False)
    with MergeLog() as log:
        layer.compress()
    layer.compress()  # not logged
    expected = (acc[0, 0, [2, 4, 5]] / 0.9).sum() + (acc[0, 1, [0, 3, 5]] / 0.7).sum()
    got = log.summary()[0]
    assert got["evictions"] == 6 and got["compressions"] == 2
    assert got["merges"] == pytest.approx(float(expected)) and got["pass_rate"] == pytest.approx(float(expected) / 6)


def test_cam_max_over_windows_with_no_windows_never_merges():
    # TOVA has neither sinks nor a recent window: nothing to normalise by
    acc = torch.rand(1, 2, 8, generator=torch.Generator().manual_seed(0))
    stats = {AccumulatedAttention.name: acc, "current_attention": acc.clone()}
    layer = hand_made_layer("tova+cam", 5, positions=8, stats=stats, gate="expected", max_over="windows")
    values = layer.values.clone()
    layer.compress()
    kept = kept_positions(layer)
    for h in range(2):
        torch.testing.assert_close(layer.values[0, h], values[0, h, kept[h]])


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"normalizer": "median"}, ValueError, "normalizer must be one of 'max', 'mean'"),
        ({"max_over": "all"}, ValueError, "max_over must be one of 'kept', 'windows'"),
        ({"normalizer": "mean", "max_over": "windows"}, ValueError, "applies to normalizer='max' only"),
        ({"gate": "always"}, ValueError, "gate must be one of 'bernoulli', 'expected'"),
        ({"targets": "all"}, ValueError, "targets must be one of 'next', 'window'"),
        ({"per_step": 1}, TypeError, "per_step must be a bool"),
        ({"centered": "yes"}, TypeError, "centered must be a bool"),
    ],
)
def test_cam_options_are_validated(options, error, match):
    with pytest.raises(error, match=match):
        kvmerge.make_method("h2o+cam", 8, **options)
    shipped = kvmerge.make_method("h2o+cam", 8).absorber
    assert (shipped.normalizer, shipped.gate, shipped.centered, shipped.targets) == ("max", "expected", True, "window")


def test_cam_bulk_eviction_cascades_like_single_evictions():
    """Evicting 6 entries in one compression equals evicting them one by one in position order: each
    evicted value (with what it received) goes to the next m entries present, not all to the same kept m."""
    acc = torch.ones(1, 1, 10)  # p = 1 everywhere: every eviction merges
    layer = hand_made_layer("streaming+cam", budget=4, positions=10, stats={AccumulatedAttention.name: acc},
                            heads=1, merge_window=3, sink=1, **PAPER)  # fmt: skip
    values = layer.values.clone()
    layer.compress()
    assert kept_positions(layer) == [[0, 7, 8, 9]]  # sink 0 + the 3 most recent: 1-6 evicted at once
    current = values[0, 0].clone()
    for i in range(1, 7):
        current[i + 1 : i + 4] += current[i] / 3
    torch.testing.assert_close(layer.values[0, 0], current[[0, 7, 8, 9]])
    assert float(layer.values[0, 0, 1:].norm(dim=-1).max()) < 3 * float(values[0, 0].norm(dim=-1).max())


def test_cam_with_certain_gate_adds_value_over_m():
    # recent = 2 (4, 5); the 3 heaviest of 0-3 are 1, 0, 2, so 3 is evicted with p = 0.5 / mean(0.5, 0.5) = 1
    acc = torch.tensor([[[3.0, 5.0, 1.0, 0.5, 0.5, 0.5]]])
    layer = hand_made_layer(
        "h2o+cam",
        budget=5,
        positions=6,
        stats={AccumulatedAttention.name: acc},
        heads=1,
        merge_window=2,
        recent=2,
        **PAPER,
    )
    values = layer.values.clone()
    layer.compress()
    assert kept_positions(layer) == [[0, 1, 2, 4, 5]]
    expected = values[0, 0, [0, 1, 2, 4, 5]].clone()
    expected[3:] += values[0, 0, 3] / 2
    torch.testing.assert_close(layer.values[0, 0], expected)


def test_hashed_uniform_is_uniform_and_seeded():
    positions = torch.arange(20000)
    u = hashed_uniform(0, 3, torch.tensor(1), positions)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(u, hashed_uniform(0, 3, torch.tensor(1), positions))
    assert not torch.equal(u, hashed_uniform(1, 3, torch.tensor(1), positions))
    assert not torch.equal(u, hashed_uniform(0, 4, torch.tensor(1), positions))


def test_head_keys_of_stacked_layers_are_each_layers_keys():
    layers = torch.tensor([0, 0, 3, 3, 7, 7]).view(-1, 1, 1)  # three layers of batch 2, stacked
    stacked = head_keys(5, layers, 4)
    assert stacked.shape == (6, 4, 1)
    for row, layer in enumerate(layers.view(-1).tolist()):
        assert torch.equal(stacked[row], head_keys(5, layer, 4)[0])
    positions = torch.arange(6 * 4 * 3).view(6, 4, 3)
    heads = torch.arange(4).view(1, -1, 1)
    assert torch.equal(uniform_at(stacked, positions), hashed_uniform(5, layers, heads, positions))


def test_cam_gate_draws_depend_on_the_seed():
    # even positions 0-6 are light (evicted, p = 0.5 / 1.0), odd 1-7 heavy (kept), 8-11 recent; m = 1 pairs them
    heads, positions = 64, 12
    acc = torch.ones(1, heads, positions)
    acc[..., 0:8:2] = 0.5
    merged = []
    for seed in (0, 1):
        layer = hand_made_layer(
            "h2o+cam",
            budget=8,
            positions=positions,
            stats={AccumulatedAttention.name: acc},
            heads=heads,
            merge_window=1,
            recent=4,
            seed=seed,
            **PAPER,
        )
        values = layer.values.clone()
        layer.compress()
        assert kept_positions(layer)[0] == [1, 3, 5, 7, 8, 9, 10, 11]
        merged.append((layer.values[:, :, :4] != values[:, :, 1:8:2]).any(-1))
    assert not torch.equal(merged[0], merged[1])
    assert 0.4 < float(torch.stack(merged).float().mean()) < 0.6


def test_knorm_keeps_smallest_key_norms():
    layer = hand_made_layer("knorm", budget=3, positions=6, stats={}, heads=1)
    layer.keys = torch.tensor([[[[3.0, 0], [0.5, 0], [2.0, 0], [0, 0.1], [0, 4.0], [1.0, 1.0]]]])
    layer.values = torch.zeros_like(layer.keys)
    layer.compress()
    assert kept_positions(layer) == [[1, 3, 5]]


def test_random_is_seeded_and_changes_every_step():
    def evicted(seed: int, seen: int) -> list[int]:
        layer = hand_made_layer("random", budget=6, positions=10, stats={}, heads=1, seed=seed)
        layer.valid_seen = torch.tensor([seen])
        layer.compress()
        return sorted(set(range(10)) - set(kept_positions(layer)[0]))

    assert evicted(0, 10) == evicted(0, 10)
    assert len({tuple(evicted(seed, seen)) for seed in range(3) for seen in range(10, 14)}) > 6
    counts = torch.zeros(10)
    for seen in range(10, 410):
        counts[evicted(1, seen)] += 1
    assert counts.min() > 100 and counts.max() < 220  # 160 expected per position


def test_corm_drops_unimportant_keys_even_under_budget_and_caps_the_rest():
    history = torch.tensor([[[0b1, 0b0, 0b10, 0b0, 0b100, 0b0, 0b11, 0b0],
                             [0b0, 0b0, 0b0, 0b0, 0b0, 0b0, 0b0, 0b0]]])  # fmt: skip
    layer = hand_made_layer("corm", budget=100, positions=8, stats={"important_history": history}, recent=2,
                            window=4)  # fmt: skip
    layer.compress()
    # head 0: important 0, 2, 4, 6 + recent 6, 7; head 1: only the recent window; rows padded with empty slots
    assert kept_positions(layer) == [[0, 2, 4, 6, 7], [6, 7]]
    assert layer.keys.shape[-2] == 5
    capped = hand_made_layer("corm", budget=4, positions=8, stats={"important_history": history}, recent=2, window=4)
    capped.compress()
    assert kept_positions(capped) == [[0, 2, 6, 7], [6, 7]]  # under the cap, equal counts go to the older entry


def test_observation_window_attention_counts_only_the_last_queries():
    probs = torch.tensor([[[[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]]])  # one head, rows at positions 1 and 2
    seen = Observation(probs, torch.ones(1, 1, 2, 3, dtype=torch.bool), torch.tensor([[1, 2]]), torch.tensor([3]))
    votes = ObservationWindowAttention(window=1).update(torch.zeros(1, 1, 3), seen)
    torch.testing.assert_close(votes, torch.tensor([[[0.2, 0.3, 0.5]]]))


def test_snapkv_keeps_max_pooled_votes_and_the_window():
    votes = torch.tensor([[[0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.2, 0.2]]])
    layer = hand_made_layer("snapkv", budget=6, positions=12, stats={ObservationWindowAttention.name: votes}, heads=1,
                            schedule="prefill", window=2, kernel=3, pooling="max")  # fmt: skip
    layer.compress()  # pooled (kernel 3) over positions 0-9: 0.9 spreads to 1-3, 0.1 to 7-9 (not the window's 0.2)
    assert kept_positions(layer) == [[1, 2, 3, 7, 10, 11]]  # ties (7, 8, 9 at 0.1) go to the older entry


def official_snapkv(votes: torch.Tensor, window: int, kernel: int, keep: int) -> list[int]:
    """SnapKV's official selection (``snapkv_utils.py``, ``pooling='avgpool'``) for one head: votes of the
    entries before the window, ``avg_pool1d`` with zero padding, top ``keep - window``, plus the window."""
    prefix = votes[:-window].view(1, 1, -1)
    pooled = torch.nn.functional.avg_pool1d(prefix, kernel, padding=kernel // 2, stride=1).view(-1)
    top = pooled.topk(keep - window).indices.tolist()
    return sorted(top + list(range(len(votes) - window, len(votes))))


@pytest.mark.parametrize("seed", range(4))
def test_snapkv_selects_as_the_official_code(seed):
    votes = torch.rand(1, 1, 40, generator=torch.Generator().manual_seed(seed))
    layer = hand_made_layer("snapkv", budget=16, positions=40, stats={ObservationWindowAttention.name: votes}, heads=1,
                            schedule="prefill", window=8, kernel=5)  # fmt: skip
    layer.compress()
    assert kept_positions(layer) == [official_snapkv(votes[0, 0], window=8, kernel=5, keep=16)]


def test_snapkv_needs_the_prefill_schedule():
    with pytest.raises(ValueError, match="snapkv works at prefill: pass schedule='prefill'"):
        build_method("snapkv", CompressionConfig(budget=8))
    with pytest.raises(ValueError, match="snapkv works at prefill: pass schedule='prefill'"):
        kvmerge.make_method("snapkv", 8, schedule="step")
    assert kvmerge.make_method("snapkv", 8).config.schedule == "prefill"  # its own schedule by default
    assert kvmerge.make_method("h2o", 8).config.schedule == "step"


@pytest.mark.parametrize(("method", "options", "message"), [
    ("corm", {"window": 0}, "corm window must be an int in"),
    ("corm", {"threshold": -1.0}, "corm threshold must be > 0"),
    ("snapkv", {"kernel": 4}, "kernel must be odd"),
    ("snapkv", {"pooling": "median"}, "pooling must be one of 'avg', 'max'"),
    ("h2o", {"window": 3}, "'h2o' takes no option(s) window"),
])  # fmt: skip
def test_method_options_are_validated(method, options, message):
    schedule = "prefill" if method == "snapkv" else "step"
    with pytest.raises((ValueError, TypeError)) as info:
        build_method(method, CompressionConfig(budget=8, schedule=schedule), **options)
    assert message in str(info.value)


def test_kvmerger_merges_similar_runs_into_their_pivot():
    from kvmerge.absorbers.kvmerger import merging_sets

    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.1], [0.1, 1.0], [1.0, 0.0], [1.0, 0.05], [-1.0, 0.0]])
    candidates = torch.tensor([True] * 6 + [False])
    sets = merging_sets(keys.view(1, 1, 7, 2), candidates.view(1, 1, 7), threshold=0.99)
    assert sets[0, 0].tolist() == [-1, 2, 2, 2, 3, 3, -1]  # runs 1-3 and 4-5; 0 and 6 stand alone

    acc = torch.tensor([[[0.1, 0.2, 0.9, 0.3, 0.1, 0.4, 0.5, 0.6, 0.7, 0.8]]])
    layer = hand_made_layer("snapkv+kvmerger", budget=10, positions=10, stats={"accumulated_attention": acc,
                            ObservationWindowAttention.name: torch.zeros(1, 1, 10)}, heads=1, schedule="prefill",
                            window=3, similarity=0.99, sigma=0.5)  # fmt: skip
    layer.keys[0, 0, :7] = torch.cat([keys, torch.zeros(7, DIM - 2)], dim=-1)
    keys_before, values_before = layer.keys.clone(), layer.values.clone()
    layer.budgets = torch.tensor([7])  # 10 entries over a budget of 7: compress
    layer.budget_max = layer.budget_min = 7
    layer.compress()
    assert kept_positions(layer) == [[0, 2, 5, 6, 7, 8, 9]]  # pivots 2 (largest Ā of 1-3) and 5 (of 4-5)
    for pivot, members in ((2, [1, 2, 3]), (5, [4, 5])):
        distance = (keys_before[0, 0, members] - keys_before[0, 0, pivot]).pow(2).sum(-1)
        weight = torch.exp(-distance / (2 * 0.5**2))
        weight = weight / weight.sum()
        slot = kept_positions(layer)[0].index(pivot)
        torch.testing.assert_close(layer.keys[0, 0, slot], (weight[:, None] * keys_before[0, 0, members]).sum(0))
        torch.testing.assert_close(layer.values[0, 0, slot], (weight[:, None] * values_before[0, 0, members]).sum(0))
    for slot, position in enumerate(kept_positions(layer)[0]):  # entries in no set are untouched, the last too
        if position not in (2, 5):
            assert torch.equal(layer.keys[0, 0, slot], keys_before[0, 0, position])
            assert torch.equal(layer.values[0, 0, slot], values_before[0, 0, position])


def test_kvmerger_needs_the_prefill_schedule():
    with pytest.raises(ValueError, match="kvmerger works at prefill"):
        kvmerge.make_method("h2o+kvmerger", 8, schedule="step")
    assert kvmerge.make_method("h2o+kvmerger", 8, decode_interval=4).config.schedule == "prefill"


def test_options_for_picks_what_each_method_takes():
    from kvmerge.registry import options_for

    options = {"kernels": "dir", "merge_window": 32, "sink": 8, "window": 16}
    assert options_for("full", options) == {}
    assert options_for("h2o", options) == {"merge_window": 32, "sink": 8}  # shared options: every method
    assert options_for("corm+less", options) == {"kernels": "dir", "merge_window": 32, "sink": 8, "window": 16}
