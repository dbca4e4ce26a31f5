"""The cache's fast paths (issue 5): the decoding step's one-entry eviction equals the full ranking, in
any slot order; evicting in place (no compaction) holds exactly what compaction holds, step after step;
the buffers keep room for one step so that appending does not reallocate the cache; compressing all
layers' decoding steps at once gives bit for bit what compressing them one by one gives; and CaM's
one-eviction path merges exactly as its general path."""

from __future__ import annotations

import pytest
import torch

import kvmerge
from kvmerge.cache import KVMergeCache, KVMergeLayer, LayerStack
from kvmerge.method import Entries, Eviction
from kvmerge.slots import _flat_rows, add_to_slots, copy_slots, read_slots
from tests.conftest import VOCAB, random_less_kernels, tiny_model


def layer_over_budget(method: str, budget: int, heads: int = 3, batch: int = 2, **options) -> KVMergeLayer:
    """A layer of ``budget`` + 1 entries per row (positions 0..budget), as after a decoding step's append."""
    layer = KVMergeLayer(kvmerge.make_method(method, budget, **options), layer_idx=0)
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
    dropped = layer._lowest(scores, layer.index)
    kept_slots, slots, evicted, _ = layer._drop(dropped, 17)
    ranked_kept, ranked_slots, ranked_evicted, _ = layer._rank(scores, layer.index)
    assert torch.equal(kept_slots, ranked_kept) and torch.equal(slots, ranked_slots)
    assert torch.equal(evicted(), ranked_evicted())
    # the newest of the lowest entries goes
    for b in range(2):
        for h in range(3):
            row = scores[b, h]
            assert int(dropped[b, h, 0]) == int(torch.nonzero(row == row.min()).max())
    # the same position goes whatever the order of the slots
    shuffle = torch.randperm(17, generator=generator).expand(2, 3, 17)
    shuffled = layer._lowest(scores.gather(-1, shuffle), layer.index.gather(-1, shuffle))
    assert torch.equal(shuffle.gather(-1, shuffled), dropped)


def test_an_adaptive_selector_always_ranks():
    # CORM scores -inf to evict regardless of the budget: never the one-entry shortcut
    layer = layer_over_budget("corm", budget=8)
    assert not layer._one_over_budget(9)
    assert layer_over_budget("h2o", budget=8)._one_over_budget(9)


def by_position(layer: KVMergeLayer) -> dict[str, torch.Tensor]:
    """The layer's per-entry tensors with every row's slots sorted by position."""
    order = layer.index.argsort(dim=-1)
    tensors = {"index": layer.index, "keys": layer.keys, "values": layer.values, **layer.stats}
    return {
        name: t.gather(2, order.view(*order.shape, *(1,) * (t.dim() - 3)).expand_as(t)) for name, t in tensors.items()
    }


@pytest.fixture(scope="module")
def less_kernels(tmp_path_factory):
    return random_less_kernels(tmp_path_factory.mktemp("less"), layers=2)


@pytest.mark.parametrize(
    "method", ["streaming", "streaming+cam", "h2o", "h2o+cam", "h2o+less", "tova", "scissorhands", "knorm", "random"]
)
def test_evicting_in_place_holds_what_compaction_holds(method, less_kernels):
    """Decoding one token at a time, then a chunk (which ranks several entries after in-place steps):
    the in-place cache holds, position by position, what the compacting cache holds (LESS: the same
    state), and the logits agree."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(2))
    options = {"kernels": less_kernels} if method.endswith("+less") else {}
    caches = [kvmerge.make_cache(model, method, 12, chunk_size=4, **options) for _ in range(2)]
    for layer in caches[1].layers:
        layer._evicts_in_place = False
    outputs = [[], []]
    with torch.no_grad():
        for cache, logits in zip(caches, outputs, strict=True):
            logits.append(model(ids[:, :20], **kvmerge.with_cache(model, cache)).logits)
            for t in range(20, 60):
                logits.append(model(ids[:, t : t + 1], **kvmerge.with_cache(model, cache)).logits)
            ordered = [layer.ordered for layer in cache.layers]
            assert ordered == [cache is caches[1]] * len(ordered)  # only the in-place cache lost the order
            logits.append(model(ids[:, 60:80], **kvmerge.with_cache(model, cache)).logits)
    for fast, slow in zip(*outputs, strict=True):
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for fast, slow in zip(caches[0].layers, caches[1].layers, strict=True):
        assert fast.keys.shape == slow.keys.shape == (2, 2, 12, 16)
        for name, tensor in by_position(fast).items():
            torch.testing.assert_close(tensor, by_position(slow)[name], atol=1e-5, rtol=1e-5, msg=name)
        for name, tensor in fast.absorber_state.items():
            torch.testing.assert_close(tensor, slow.absorber_state[name], atol=1e-5, rtol=1e-5, msg=name)


def valid_by_position(layer: KVMergeLayer) -> dict[str, torch.Tensor]:
    """:func:`by_position` with the empty slots' contents zeroed (what an empty slot holds is not kept)."""
    tensors = by_position(layer)
    valid = tensors["index"] >= 0
    return {name: t.masked_fill(~valid.view(*valid.shape, *(1,) * (t.dim() - 3)), 0) for name, t in tensors.items()}


@pytest.mark.parametrize(
    "method", ["streaming", "streaming+cam", "h2o", "h2o+cam", "h2o+less", "tova", "scissorhands", "knorm", "random"]
)
def test_one_token_steps_of_a_padded_batch_evict_in_place(method, less_kernels):
    """Teacher forcing token by token (lm-eval's protocol) on a left-padded batch with a budget per
    sequence, then padded decoding: rows under budget give up an empty slot, the others their lowest
    entry, in place; the cache holds, position by position, what the compacting cache holds, and the
    logits agree."""
    model = tiny_model("llama")
    lengths = (40, 33, 25)
    ids = torch.randint(0, VOCAB, (3, 50), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(3, 50, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, 40 - length :] = 1
    mask[:, 40:] = 1
    options = {"kernels": less_kernels} if method.endswith("+less") else {}
    caches = [kvmerge.make_cache(model, method, 0.3, chunk_size=1, **options) for _ in range(2)]
    for layer in caches[1].layers:
        layer._evicts_in_place = False
    outputs = [[], []]
    with torch.no_grad():
        for cache, logits in zip(caches, outputs, strict=True):
            for start, stop in [(0, 40), *((t, t + 1) for t in range(40, 50))]:
                positions = (mask[:, :stop].cumsum(-1) - 1).clamp(min=0)[:, start:stop]
                logits.append(
                    model(
                        ids[:, start:stop],
                        attention_mask=mask[:, :stop],
                        position_ids=positions,
                        **kvmerge.with_cache(model, cache),
                    ).logits
                )
    valid = mask[:, :40].bool()
    torch.testing.assert_close(outputs[0][0][valid], outputs[1][0][valid], atol=1e-5, rtol=1e-5)
    for fast, slow in zip(outputs[0][1:], outputs[1][1:], strict=True):
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for fast, slow in zip(caches[0].layers, caches[1].layers, strict=True):
        assert not fast.ordered  # the in-place path ran
        assert fast.keys.shape == slow.keys.shape
        expected = valid_by_position(slow)
        for name, tensor in valid_by_position(fast).items():
            torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-5, msg=name)
        for name, tensor in fast.absorber_state.items():
            torch.testing.assert_close(tensor, slow.absorber_state[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "method",
    ["streaming", "streaming+cam", "h2o", "h2o+cam", "h2o+less", "tova", "scissorhands", "knorm", "random+cam"],
)
def test_layers_compressed_together_equal_layer_by_layer(monkeypatch, family, method, less_kernels):
    """Decoding, then a 5-token call (its steps compact the buffers, unstacking them), then decoding
    again (stacked anew): the stacked cache's logits and entries equal the layer-by-layer cache's, bit for
    bit. LESS keeps per-layer state, so its layers always compress one by one."""
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(5))
    options = {"kernels": less_kernels} if method.endswith("+less") else {}
    together = kvmerge.make_cache(model, method, 12, chunk_size=4, **options)
    alone = KVMergeCache(together.method, len(together.layers), compress_together=False)
    stackings = []
    stack = LayerStack._stack
    monkeypatch.setattr(LayerStack, "_stack", lambda self: stackings.append(stack(self)) or stackings[-1])
    calls = [(0, 20), *((t, t + 1) for t in range(20, 40)), (40, 45), *((t, t + 1) for t in range(45, 60))]
    with torch.no_grad():
        logits = [
            [model(ids[:, s:e], **kvmerge.with_cache(model, cache)).logits for s, e in calls]
            for cache in (together, alone)
        ]
    assert all(torch.equal(a, b) for a, b in zip(*logits, strict=True))
    for stacked, single in zip(together.layers, alone.layers, strict=True):
        for name, tensor in stacked._named(stacked.entries).items():
            assert torch.equal(tensor, single._named(single.entries)[name]), name
    assert stackings == ([] if method.endswith("+less") else [True, True])


def test_the_stack_lets_go_of_its_buffers_when_a_layer_compresses_alone():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(7))
    cache = kvmerge.make_cache(model, "h2o+cam", 12, chunk_size=4)
    stack = cache.layers[0].stack
    with torch.no_grad():
        model(ids[:, :20], **kvmerge.with_cache(model, cache))
        model(ids[:, 20:21], **kvmerge.with_cache(model, cache))
        shared = {layer.keys.untyped_storage().data_ptr() for layer in cache.layers}
        assert stack._full and len(shared) == 1  # every layer's keys live in one buffer
        model(ids[:, 21:26], **kvmerge.with_cache(model, cache))  # steps of 1 and 4 tokens: each layer compresses alone
        assert stack._stacked is None and not stack._full and not stack._slices
        model(ids[:, 26:27], **kvmerge.with_cache(model, cache))
    assert {layer.keys.untyped_storage().data_ptr() for layer in cache.layers} == {
        stack._full["keys"].untyped_storage().data_ptr()
    }


@pytest.mark.parametrize("method", ["h2o+cam", "tova"])
def test_beam_search_reorders_stacked_layers(method):
    """Beam search reorders the cache's rows every step (the layers leave the stack and rejoin it)."""
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 24), generator=torch.Generator().manual_seed(6))
    outputs = []
    for together in (True, False):
        cache = KVMergeCache(kvmerge.make_method(method, 10), 2, compress_together=together)
        kvmerge.make_cache(model, method, 10)  # switches the model to kvmerge attention
        outputs.append(
            model.generate(
                ids, **kvmerge.with_cache(model, cache), num_beams=3, max_new_tokens=12, do_sample=False, pad_token_id=0
            )
        )
    assert torch.equal(*outputs)


@pytest.mark.parametrize(
    ("shape", "kept", "flat"),
    [
        ((2, 3, 10, 4), 7, True),  # a prefix of a buffer with room
        ((1, 3, 10, 4), 10, True),
        ((2, 1, 10), 5, True),  # statistics: no trailing dims
        ((1, 1, 10, 2), 9, True),
        ((3, 10, 2, 4), 7, False),  # entries not along dim 2 of the buffer: the element-wise ops
    ],
)
def test_slot_updates_equal_gather_and_scatter(shape, kept, flat):
    generator = torch.Generator().manual_seed(8)
    buffer = torch.randn(shape, generator=generator)
    tensor = buffer.narrow(2, 0, kept) if flat else buffer.transpose(1, 2).narrow(2, 0, kept)
    assert (_flat_rows(tensor) is not None) == flat
    batch, heads, tail = tensor.shape[0], tensor.shape[1], tensor.shape[3:]

    def spread(slots):
        return slots.view(*slots.shape, *(1,) * len(tail)).expand(*slots.shape, *tail)

    source = torch.randint(0, kept, (batch, heads, 2), generator=generator)
    assert torch.equal(read_slots(tensor, source), tensor.gather(2, spread(source)))
    expected = tensor.clone()
    expected.scatter_(2, spread(source.flip(-1)), expected.gather(2, spread(source)))
    copy_slots([tensor], source, source.flip(-1))
    assert torch.equal(tensor, expected)
    slots = torch.randint(0, kept, (batch, heads, 6), generator=generator)  # repeats add up
    values = torch.randn(batch, heads, 6, *tail, generator=generator)
    expected.scatter_add_(2, spread(slots), values)
    outside = buffer.narrow(2, kept, shape[2] - kept).clone() if flat else None
    add_to_slots(tensor, slots, values)
    torch.testing.assert_close(tensor, expected)
    if flat:  # the room past the prefix is untouched
        assert torch.equal(buffer.narrow(2, kept, shape[2] - kept), outside)


def test_evicting_in_place_copies_two_entries_per_row():
    layer = layer_over_budget("h2o", budget=6, heads=2, batch=1)
    layer.stats["accumulated_attention"] = torch.tensor([[[9.0, 5, 1, 7, 8, 6, 4], [9.0, 0.5, 3, 7, 8, 6, 4]]])
    keys = layer.keys.clone()
    layer._step_rows = 1
    layer.compress()  # h2o keeps 3 recent (4, 5, 6) and the heaviest of 0-3: drops 2 (head 0) and 1 (head 1)
    assert layer.index[0].tolist() == [[0, 1, 6, 3, 4, 5], [0, 6, 2, 3, 4, 5]]
    assert torch.equal(layer.keys[0, 0], keys[0, 0, [0, 1, 6, 3, 4, 5]])
    assert layer.stats["accumulated_attention"][0, 1].tolist() == [9.0, 4, 3, 7, 8, 6]
    assert not layer.ordered


def test_decoding_holds_the_budget_with_room_for_one_entry():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    cache = kvmerge.make_cache(model, "h2o+cam", 16, chunk_size=8)
    with torch.no_grad():
        model(ids, **kvmerge.with_cache(model, cache))
        for t in range(3):
            model(ids[:, t : t + 1], **kvmerge.with_cache(model, cache))
    for layer in cache.layers:
        entry = layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size()
        assert layer.kv_bytes() == 2 * 16 * entry  # exact: kept entries x bytes per entry
        # room for one decoding step: one entry per row beyond the budget, in a buffer all layers share
        assert layer.keys.untyped_storage().nbytes() == len(cache.layers) * (16 + 1) * entry


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
    assert layer.index[0, 0].tolist() == [0, 1, 2, 3, 6, 5, 7]  # position 4 went, 6 took its slot


def test_room_is_kept_for_decoding_only():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(1))
    cache = kvmerge.make_cache(model, "streaming", 20, chunk_size=8)
    layer = cache.layers[0]
    with torch.no_grad():
        model(ids, **kvmerge.with_cache(model, cache))
        entry = layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size()
        assert layer.kv_bytes() == 2 * 20 * entry
        assert layer.keys.untyped_storage().nbytes() == 20 * entry  # after steps of 8 tokens: no room
        model(ids[:, :1], **kvmerge.with_cache(model, cache))
    assert layer.kv_bytes() == 2 * 20 * entry
    assert layer.keys.untyped_storage().nbytes() == len(cache.layers) * 21 * entry  # one buffer for all layers


CAM_VARIANTS = [
    {"normalizer": "mean", "gate": "bernoulli", "centered": False},
    {"normalizer": "max", "gate": "bernoulli", "centered": False},
    {"normalizer": "max", "max_over": "windows", "gate": "bernoulli"},
    {"normalizer": "max", "gate": "expected", "centered": False, "per_step": True},
    {"normalizer": "mean", "gate": "expected", "centered": True},
    {"normalizer": "mean", "targets": "window", "gate": "bernoulli"},
    {"targets": "window"},
    {},  # as shipped
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("options", CAM_VARIANTS, ids=lambda o: "-".join(map(str, o.values())) or "shipped")
def test_cam_one_eviction_path_merges_as_its_general_path(seed, options):
    layer = layer_over_budget("h2o+cam", budget=12, batch=2, **options)
    generator = torch.Generator().manual_seed(seed)
    layer.stats = {name: torch.rand(2, 3, 13, generator=generator) for name in layer.stats}
    before = layer.entries
    scores = layer.stats["accumulated_attention"].clone()
    scores[..., :2] = float("inf")
    dropped = layer._lowest(scores, before.index)
    kept_slots, _, evicted, _ = layer._drop(dropped, 13)
    pick = kept_slots.unsqueeze(-1).expand(-1, -1, -1, 4)
    results = []
    for slots in (dropped, None):  # the one-eviction path, then the general one (finds the slots itself)
        after = Entries(
            before.keys.gather(2, pick), before.values.gather(2, pick), before.index.gather(-1, kept_slots),
            {name: v.gather(-1, kept_slots) for name, v in before.stats.items()}, before.seen, 0,
        )  # fmt: skip
        windows = (layer.sink, (layer.valid_seen - layer.recent).view(-1, 1, 1))
        eviction = Eviction(before, after, kept_slots, evicted(), {}, slots, windows=windows)
        layer.method.absorber.absorb(eviction, layer.method.config)
        results.append(after.values)
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)  # (the two paths sum in another order)
    assert not torch.equal(results[0], before.values.gather(2, pick))  # something merged


@pytest.mark.parametrize("method", ["h2o+cam", "scissorhands+cam", "streaming+cam"])
@pytest.mark.parametrize(("chunk", "padded"), [(1, False), (4, True)])
def test_value_sums_made_with_the_attention_equal_a_pass_over_the_values(monkeypatch, method, chunk, padded):
    """CaM's Ō numerator, ``sum_j Ā_j V_j``, comes out of the step's attention as one more row of its value
    product (the stacked decoding path included): the same as computing it from the entries, to float
    rounding, and the same logits as a CaM that computes it itself."""
    from kvmerge.absorbers import cam

    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :9] = 0
    checked, mean_output = [], cam._mean_output

    def compare(entries: Entries) -> torch.Tensor:
        fused = entries.value_sums[cam.AccumulatedAttention.name]
        attention = entries.stats[cam.AccumulatedAttention.name].masked_fill(entries.index < 0, 0.0)
        torch.testing.assert_close(fused, attention.unsqueeze(-2) @ entries.values.float(), atol=1e-5, rtol=1e-5)
        checked.append(entries.index.shape[0])
        return mean_output(entries)

    def run(fused: bool) -> torch.Tensor:
        if not fused:
            monkeypatch.setattr(cam.CaM, "value_sums", lambda self: ())
        cache = kvmerge.make_cache(model, method, 12, chunk_size=chunk)
        with torch.no_grad():
            out = [model(ids[:, :30], attention_mask=mask[:, :30], **kvmerge.with_cache(model, cache)).logits]
            for t in range(30, 40):
                step = {"attention_mask": mask[:, : t + 1]}
                out.append(model(ids[:, t : t + 1], **step, **kvmerge.with_cache(model, cache)).logits)
        return torch.cat(out, dim=1)

    monkeypatch.setattr(cam, "_mean_output", compare)
    fused = run(fused=True)
    assert checked and max(checked) == 2 * 2  # the stacked decoding step: 2 layers x 2 sequences as one
    monkeypatch.setattr(cam, "_mean_output", mean_output)
    torch.testing.assert_close(run(fused=False), fused, atol=1e-5, rtol=1e-5)
