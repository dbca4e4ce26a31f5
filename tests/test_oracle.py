"""Oracle tests: compressed caches against full attention."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

import kvmerge
from kvmerge.cache import KVMergeLayer, LayerStack
from tests.conftest import FAMILIES, VOCAB, tiny_model

COMPRESSING = [m for m in kvmerge.method_names() if m != "full" and not m.endswith("+less")]  # LESS: test_less.py
EVICTION_ONLY = ["streaming", "h2o", "scissorhands", "tova", "corm", "random", "knorm"]


def identity_options(method: str) -> dict:
    """Options under which a budget >= length must evict nothing (CORM's size is adaptive: all keys important)."""
    options = {"schedule": "prefill"} if "snapkv" in method or "kvmerger" in method else {"chunk_size": 3}
    return options | ({"threshold": 1e-30} if method.startswith("corm") else {})


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kvmerge.with_cache(model, DynamicCache(config=model.config))).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_full_is_dynamic_cache_bit_for_bit(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    reference = model.generate(
        ids,
        max_new_tokens=6,
        do_sample=False,
        **kvmerge.with_cache(model, DynamicCache(config=model.config)),
        output_logits=True,
        return_dict_in_generate=True,
    )
    cache = kvmerge.make_cache(model, "full")
    ours = model.generate(
        ids,
        max_new_tokens=6,
        do_sample=False,
        **kvmerge.with_cache(model, cache),
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(reference.sequences, ours.sequences)
    for a, b in zip(reference.logits, ours.logits, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", COMPRESSING)
def test_budget_at_least_length_gives_full_logits(family, method):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(
            ids, **kvmerge.with_cache(model, kvmerge.make_cache(model, method, budget=20, **identity_options(method)))
        ).logits
    torch.testing.assert_close(ours, full_logits(model, ids), atol=1e-5, rtol=1e-5)


def record_evictions(monkeypatch) -> dict[int, list[tuple[int, torch.Tensor]]]:
    """Patch the cache's two ways of compressing (a layer alone, or the layers stacked) to log, per
    layer, (step, positions evicted ``[kv_heads, k]`` bool)."""
    log: dict[int, list[tuple[int, torch.Tensor]]] = {}

    def note(layer: KVMergeLayer, before: torch.Tensor) -> None:
        step = int(layer.valid_seen[0]) - 1
        heads = before.shape[1]
        kept = torch.zeros(heads, step + 1, dtype=torch.bool)
        was = torch.zeros(heads, step + 1, dtype=torch.bool)
        for h in range(heads):
            kept[h, layer.index[0, h][layer.index[0, h] >= 0]] = True
            was[h, before[0, h][before[0, h] >= 0]] = True
        log.setdefault(layer.layer_idx, []).append((step, was & ~kept))

    compress, compress_stacked = KVMergeLayer.compress, LayerStack._compress_stacked

    def compress_alone(self):
        before = self.index.clone()
        compress(self)
        if isinstance(self.layer_idx, int):  # else the layers stacked as one, noted below
            note(self, before)

    def compress_together(self):
        before = [layer.index.clone() for layer in self.layers]
        compress_stacked(self)
        for layer, index in zip(self.layers, before, strict=True):
            note(layer, index)

    monkeypatch.setattr(KVMergeLayer, "compress", compress_alone)
    monkeypatch.setattr(LayerStack, "_compress_stacked", compress_together)
    return log


def masked_reference(model, ids: torch.Tensor, log) -> torch.Tensor:
    """Full attention (DynamicCache) where each layer and KV head hides exactly what kvmerge evicted, when it did."""
    length = ids.shape[1]
    masks = {}
    for layer_idx, events in log.items():
        heads = events[0][1].shape[0]
        visible = torch.ones(heads, length, length, dtype=torch.bool).tril()
        for step, evicted in events:
            cols = torch.nonzero(evicted, as_tuple=False)
            for h, j in cols.tolist():
                visible[h, step + 1 :, j] = False
        masks[layer_idx] = visible

    def oracle(module, query, key, value, attention_mask, scaling=None, **kwargs):
        group = query.shape[1] // key.shape[1]
        mask = masks.get(module.layer_idx, torch.ones(key.shape[1], length, length, dtype=torch.bool).tril())
        mask = mask.repeat_interleave(group, dim=0).unsqueeze(0)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), attn_mask=mask, scale=scaling
        )
        return out.transpose(1, 2), None

    AttentionInterface.register("kvmerge_test_oracle", oracle)
    previous = model.config._attn_implementation
    model.set_attn_implementation("kvmerge_test_oracle")
    try:
        return full_logits(model, ids)
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", EVICTION_ONLY)
def test_eviction_equals_full_attention_under_mask(monkeypatch, family, method):
    model = tiny_model(family, layers=3)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    log = record_evictions(monkeypatch)
    cache = kvmerge.make_cache(model, method, budget=12, chunk_size=1)
    with torch.no_grad():  # a prompt call, then decoding calls: positions must stay true across calls
        ours = [model(ids[:, :25], **kvmerge.with_cache(model, cache)).logits]
        ours += [model(ids[:, t : t + 1], **kvmerge.with_cache(model, cache)).logits for t in range(25, 40)]
    ours = torch.cat(ours, dim=1)
    assert sum(len(v) for v in log.values()) > 0
    layer = cache.layers[0]  # decoding compressed all layers at once, where it evicts one entry in place
    assert (layer.stack._stacked is not None) == (layer._evicts_in_place and not layer.method.selector.adaptive)
    reference = masked_reference(model, ids, log)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    # and the compression was not a no-op
    assert (ours - full_logits(model, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["h2o+cam", "scissorhands", "tova", "streaming+cam"])
@pytest.mark.parametrize("chunk", [1, 5])
def test_one_call_in_steps_equals_feeding_steps_one_by_one(llama, method, chunk):
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = llama(
            ids, **kvmerge.with_cache(llama, kvmerge.make_cache(llama, method, budget=10, chunk_size=chunk))
        ).logits
        cache = kvmerge.make_cache(llama, method, budget=10, chunk_size=chunk)
        parts = [llama(ids[:, s : s + chunk], **kvmerge.with_cache(llama, cache)).logits for s in range(0, 30, chunk)]
    torch.testing.assert_close(whole, torch.cat(parts, dim=1), atol=1e-5, rtol=1e-5)
