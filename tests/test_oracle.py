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


def record_evictions(monkeypatch) -> dict[int, list[tuple[int, int, torch.Tensor]]]:
    """Patch the cache's two ways of compressing (a layer alone, or the layers stacked) to log, per
    layer, (batch row, step, positions evicted ``[kv_heads, step + 1]`` bool)."""
    log: dict[int, list[tuple[int, int, torch.Tensor]]] = {}

    def note(layer: KVMergeLayer, before: torch.Tensor) -> None:
        for row in range(before.shape[0]):
            step = int(layer.valid_seen[row]) - 1
            kept = torch.zeros(before.shape[1], step + 1, dtype=torch.bool, device=before.device)
            was = torch.zeros_like(kept)
            for h in range(before.shape[1]):
                kept[h, layer.index[row, h][layer.index[row, h] >= 0]] = True
                was[h, before[row, h][before[row, h] >= 0]] = True
            log.setdefault(layer.layer_idx, []).append((row, step, was & ~kept))

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


def evicted_count(log) -> int:
    """Entries evicted in all, every layer, row and head."""
    return sum(int(evicted.sum()) for events in log.values() for _, _, evicted in events)


def masked_reference(model, ids: torch.Tensor, log) -> torch.Tensor:
    """Full attention (DynamicCache) where each layer, sequence and KV head hides exactly what kvmerge
    evicted, from the step after it did; ``ids`` ``[batch, length]`` without padding."""
    batch, length = ids.shape
    masks = {}
    for layer_idx, events in log.items():
        heads = events[0][2].shape[0]
        visible = torch.ones(batch, heads, length, length, dtype=torch.bool, device=ids.device).tril()
        for row, step, evicted in events:
            for h, j in torch.nonzero(evicted, as_tuple=False).tolist():
                visible[row, h, step + 1 :, j] = False
        masks[layer_idx] = visible

    def oracle(module, query, key, value, attention_mask, scaling=None, **kwargs):
        group = query.shape[1] // key.shape[1]
        causal = torch.ones(batch, key.shape[1], length, length, dtype=torch.bool, device=query.device).tril()
        mask = masks.get(module.layer_idx, causal).repeat_interleave(group, dim=1)
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


def stream(model, cache, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of a ``prompt``-token call, then of one call per remaining token (positions must stay true)."""
    with torch.no_grad():
        logits = [model(ids[:, :prompt], **kvmerge.with_cache(model, cache)).logits]
        logits += [
            model(ids[:, t : t + 1], **kvmerge.with_cache(model, cache)).logits for t in range(prompt, ids.shape[1])
        ]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", EVICTION_ONLY)
def test_eviction_equals_full_attention_under_mask(monkeypatch, family, method):
    model = tiny_model(family, layers=3)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    log = record_evictions(monkeypatch)
    cache = kvmerge.make_cache(model, method, budget=12, chunk_size=1)
    ours = stream(model, cache, ids, prompt=25)
    assert evicted_count(log) > 0
    layer = cache.layers[0]  # decoding compressed all layers at once, where it evicts one entry in place
    assert (layer.stack._stacked is not None) == (layer._evicts_in_place and not layer.method.selector.adaptive)
    reference = masked_reference(model, ids, log)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    # and the compression was not a no-op
    assert (ours - full_logits(model, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["streaming", "h2o", "scissorhands", "tova", "knorm"])
@pytest.mark.parametrize(("chunk", "batch"), [(4, 1), (1, 3), (5, 2)])
def test_eviction_in_chunks_and_batches_equals_full_attention_under_mask(monkeypatch, method, chunk, batch):
    """Steps of several tokens evict after the step's rows attended; each sequence of a batch evicts its own."""
    model = tiny_model("llama", layers=2)
    ids = torch.randint(0, VOCAB, (batch, 36), generator=torch.Generator().manual_seed(5))
    log = record_evictions(monkeypatch)
    ours = stream(model, kvmerge.make_cache(model, method, budget=10, chunk_size=chunk), ids, prompt=28)
    assert evicted_count(log) > 0
    if batch > 1 and method in ("tova", "knorm"):  # rows evict different positions, so a mix-up would show
        # (a tiny random model's attention is near uniform: h2o and scissorhands then evict by age, like streaming)
        evicted = [
            {(step, *hj) for r, step, e in log[0] if r == row for hj in e.nonzero().tolist()} for row in range(batch)
        ]
        assert len({frozenset(rows) for rows in evicted}) > 1
    torch.testing.assert_close(ours, masked_reference(model, ids, log), atol=2e-5, rtol=1e-4)
    assert (ours - full_logits(model, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_snapkv_equals_full_attention_under_mask(monkeypatch, family):
    """SnapKV compresses once after the prompt: the prompt's logits are the full cache's, and every
    decoding step sees exactly the entries it kept."""
    model = tiny_model(family, layers=2)
    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(6))
    log = record_evictions(monkeypatch)
    ours = stream(model, kvmerge.make_cache(model, "snapkv", budget=16, schedule="prefill"), ids, prompt=40)
    assert all(len(events) == 1 for events in log.values()) and len(log) == 2  # once per layer
    heads = sum(evicted.shape[0] for events in log.values() for _, _, evicted in events)
    assert evicted_count(log) == heads * (40 - 16)  # every KV head drops what is over budget
    torch.testing.assert_close(ours, masked_reference(model, ids, log), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours[:, :40], full_logits(model, ids)[:, :40], atol=1e-5, rtol=1e-5)
    assert (ours[:, 40:] - full_logits(model, ids)[:, 40:]).abs().max() > 1e-3


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
