"""The cache's fast paths (issue 5): the decoding step's one-entry eviction equals the full ranking, the
buffers keep room for one step so that appending does not reallocate the cache, and CaM given the
evicted slots merges exactly as when it finds them itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kvmerge
from kvmerge.cache import KVMergeLayer
from kvmerge.method import Eviction
from tests.conftest import VOCAB, tiny_model


def layer_over_budget(method: str, budget: int, heads: int = 3, batch: int = 2) -> KVMergeLayer:
    """A layer of ``budget`` + 1 entries per row (positions 0..budget), as after a decoding step's append."""
    layer = KVMergeLayer(kvmerge.make_method(method, budget), layer_idx=0)
    n = budget + 1
    keys = torch.randn(batch, heads, n, 4, generator=torch.Generator().manual_seed(0))
    layer.lazy_initialization(keys[:, :, :0], keys[:, :, :0])
    layer.keys, layer.values = keys, keys.clone()
    layer.index = torch.arange(n).expand(batch, heads, n).clone()
    layer.valid_seen = torch.full((batch,), n)
    layer.seen = n
    layer.set_budgets(torch.full((batch,), budget))
    layer.compressions = 1
    return layer


@pytest.mark.parametrize("seed", range(5))
def test_dropping_one_entry_equals_the_stable_ranking(seed):
    layer = layer_over_budget("h2o", budget=16)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (2, 3, 17), generator=generator).float()  # many ties
    scores[..., :2] = float("inf")  # protected entries
    assert layer._one_over_budget(17)
    kept_slots, slots, evicted, dropped = layer._drop_one(scores)
    ranked_kept, ranked_slots, ranked_evicted, _ = layer._rank(scores, layer.index)
    assert torch.equal(kept_slots, ranked_kept) and torch.equal(slots, ranked_slots)
    assert torch.equal(evicted(), ranked_evicted())
    # the newest of the lowest entries goes
    for b in range(2):
        for h in range(3):
            row = scores[b, h]
            assert int(dropped[b, h, 0]) == int(torch.nonzero(row == row.min()).max())


def test_a_selector_scoring_minus_infinity_falls_back_to_the_ranking():
    layer = layer_over_budget("h2o", budget=8)
    scores = torch.rand(2, 3, 9)
    scores[0, 0, 3] = scores[0, 0, 5] = float("-inf")  # evict both, though only one is over budget
    assert layer._drop_one(scores) is None


def test_decoding_holds_the_budget_with_room_for_one_entry():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    cache = kvmerge.make_cache(model, "h2o+cam", 16, chunk_size=8)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        for t in range(3):
            model(ids[:, t : t + 1], past_key_values=cache)
    for layer in cache.layers:
        entry = layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size()
        assert layer.kv_bytes() == 2 * 16 * entry  # exact: kept entries x bytes per entry
        # room for one decoding step: one entry per row beyond the budget
        assert layer.keys.untyped_storage().nbytes() == (16 + 1) * entry


def test_appending_writes_into_the_room_in_place():
    layer = layer_over_budget("streaming", budget=6, heads=2, batch=1)
    layer._step_rows = 1
    layer.compress()
    keys = layer.keys
    assert keys.shape[-2] == 6 and keys.untyped_storage().nbytes() == 7 * 2 * 4 * 4
    new = torch.ones(1, 2, 1, 4)
    layer._append(new, new, torch.ones(1, 1, dtype=torch.bool), padded=False)
    assert layer.keys.data_ptr() == keys.data_ptr()  # same buffer: no reallocation
    assert torch.equal(layer.keys[:, :, :6], keys) and torch.equal(layer.keys[:, :, 6:], new)
    assert layer.index[0, 0].tolist() == [0, 1, 2, 3, 5, 6, 7]


def test_room_is_kept_for_decoding_only():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(1))
    cache = kvmerge.make_cache(model, "streaming", 20, chunk_size=8)
    layer = cache.layers[0]
    with torch.no_grad():
        model(ids, past_key_values=cache)
        entry = layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size()
        assert layer.kv_bytes() == 2 * 20 * entry
        assert layer.keys.untyped_storage().nbytes() == 20 * entry  # after steps of 8 tokens: no room
        model(ids[:, :1], past_key_values=cache)
    assert layer.kv_bytes() == 2 * 20 * entry
    assert layer.keys.untyped_storage().nbytes() == 21 * entry


def test_cam_given_the_evicted_slots_merges_as_when_it_finds_them():
    layer = layer_over_budget("h2o+cam", budget=12, batch=2)
    layer.stats["accumulated_attention"] = torch.rand(2, 3, 13, generator=torch.Generator().manual_seed(3))
    captured = []
    absorb = type(layer.method.absorber).absorb

    def capture(self, eviction, config):
        captured.append(eviction)
        absorb(self, eviction, config)

    try:
        type(layer.method.absorber).absorb = capture
        before_values = layer.values.clone()
        layer._step_rows = 1
        layer.compress()
    finally:
        type(layer.method.absorber).absorb = absorb
    (eviction,) = captured
    assert eviction.evicted_slots is not None and eviction.evicted_slots.shape == (2, 3, 1)
    merged_fast = layer.values.clone()
    # the same eviction, the absorber left to find the evicted slots itself
    after = dataclasses.replace(eviction.after, values=before_values.gather(
        2, eviction.kept_slots.unsqueeze(-1).expand(-1, -1, -1, 4)))  # fmt: skip
    slow = Eviction(eviction.before, after, eviction.kept_slots, eviction.evicted, {}, None)
    layer.method.absorber.absorb(slow, layer.method.config)
    assert torch.equal(after.values, merged_fast)
    assert not torch.equal(merged_fast, before_values[:, :, :12])
