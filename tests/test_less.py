"""LESS: the state formula on hand-made tensors, the identity, and a tiny training run that helps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kvmerge
from kvmerge.absorbers.less import LessKernels, save_kernels
from kvmerge.cache import KVMergeLayer
from kvmerge.method import Entries, Eviction
from kvmerge.training import attention_output_errors, train_less
from tests.conftest import VOCAB, tiny_model

HEAD_DIM = 16


@pytest.fixture(scope="module")
def random_kernels(tmp_path_factory):
    torch.manual_seed(0)
    kernels = nn.ModuleList(LessKernels(HEAD_DIM, hidden=8, rank=4) for _ in range(3))
    return save_kernels(kernels, tmp_path_factory.mktemp("less"), {"head_dim": HEAD_DIM, "hidden": 8, "rank": 4})


def test_state_attention_equals_the_less_formula(random_kernels):
    """After evictions, attention = (sum_kept e^s v + phi^T H) / (sum_kept e^s + phi^T z), computed naively."""
    layer = KVMergeLayer(kvmerge.make_method("h2o+less", 4, kernels=random_kernels, recent=2), layer_idx=1)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 9, HEAD_DIM, generator=generator)
    values = torch.randn(1, 2, 9, HEAD_DIM, generator=generator)
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    layer.index = torch.arange(9).expand(1, 2, 9).clone()
    layer.stats = {"accumulated_attention": torch.rand(1, 2, 9, generator=generator)}
    layer.valid_seen, layer.seen = torch.tensor([9]), 9
    layer.set_budgets(torch.tensor([9]))
    layer.compress()
    kept = layer.index[0]
    evicted = [sorted(set(range(9)) - set(row.tolist())) for row in kept]
    assert all(len(e) == 5 for e in evicted)
    # one more token arrives and attends: 4 query heads over 2 KV heads
    query = torch.randn(1, 4, 1, HEAD_DIM, generator=generator)
    new_key, new_value = torch.randn(2, 1, 2, 1, HEAD_DIM, generator=generator)
    layer._append(new_key, new_value, torch.ones(1, 1, dtype=torch.bool), padded=False)
    out = layer._attend_step(query, torch.ones(1, 1, dtype=torch.bool), scaling=0.25)[0, 0]  # [q_heads, d]
    kernels = layer.method.absorber.modules[1]
    for head in range(4):
        kv = head // 2
        q = query[0, head, 0].double()
        kept_keys = torch.cat([keys[0, kv, kept[kv]], new_key[0, kv]]).double()
        kept_values = torch.cat([values[0, kv, kept[kv]], new_value[0, kv]]).double()
        weights = torch.exp(kept_keys @ q * 0.25)
        phi = kernels.log_phi(query[0, head, 0]).exp().double()
        psi = kernels.log_psi(keys[0, kv, evicted[kv]]).exp().double()  # [e, R]
        h = psi.T @ values[0, kv, evicted[kv]].double()
        z = psi.sum(0)
        expected = (weights @ kept_values + phi @ h) / (weights.sum() + phi @ z)
        torch.testing.assert_close(out[head].double(), expected, atol=1e-5, rtol=1e-5)


def test_less_without_eviction_is_the_full_cache(random_kernels):
    model = tiny_model("llama", layers=3)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(
            ids, **kvmerge.with_cache(model, kvmerge.make_cache(model, "h2o+less", 20, kernels=random_kernels))
        ).logits
        torch.testing.assert_close(ours, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_less_needs_kernels(tmp_path):
    with pytest.raises(ValueError, match="less needs kernels=DIR"):
        kvmerge.make_method("h2o+less", 8)
    with pytest.raises(FileNotFoundError, match="no LESS kernels in"):
        kvmerge.make_method("h2o+less", 8, kernels=tmp_path)


def test_tiny_training_lowers_its_loss_and_beats_plain_eviction(tmp_path):
    model = tiny_model("llama", layers=2, seed=3)
    ids = torch.randint(0, VOCAB, (1200,), generator=torch.Generator().manual_seed(2))
    run = train_less(model, ids[:1024], "h2o", 16, directory=tmp_path, sequences=4, tokens=128, steps=60,
                     learning_rate=1e-2, progress=False)  # fmt: skip
    for curve in run.losses:
        assert sum(curve[-8:]) < 0.8 * sum(curve[:8])
    held_out = ids[1024:].view(1, -1)
    plain = attention_output_errors(model, held_out, kvmerge.make_cache(model, "h2o", 16, chunk_size=1))
    less = attention_output_errors(model, held_out, kvmerge.make_cache(model, "h2o+less", 16, chunk_size=1,
                                                                     kernels=tmp_path))  # fmt: skip
    assert sum(less) < sum(plain)


def test_kvmerger_calibration_hits_its_target():
    from kvmerge.training import calibrate_kvmerger

    model = tiny_model("llama", layers=2)
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(5))
    threshold, tried = calibrate_kvmerger(model, ids, target=0.6, recent=8)
    assert abs(tried[threshold] - 0.6) < 0.05
    fractions = [tried[t] for t in sorted(tried)]
    assert fractions == sorted(fractions)  # a higher threshold merges less


def test_given_the_evicted_slots_the_state_is_the_same(random_kernels):
    """Decoding hands LESS the evicted slots; features of those entries only give the state that masking
    every entry gives."""
    layer = KVMergeLayer(kvmerge.make_method("h2o+less", 4, kernels=random_kernels), layer_idx=2)
    generator = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 2, 3, 9, HEAD_DIM, generator=generator)
    index = torch.arange(9).expand(2, 3, 9)
    before = Entries(keys, values, index, {}, torch.tensor([9, 9]), 2)
    slots = torch.randint(0, 9, (2, 3, 1), generator=generator)
    evicted = torch.zeros(2, 3, 9, dtype=torch.bool).scatter_(-1, slots, True)
    states = []
    for given in (slots, None):
        state: dict[str, torch.Tensor] = {}
        for _ in range(2):  # a second eviction rescales the state
            eviction = Eviction(before, before, index, evicted, state, given)
            layer.method.absorber.absorb(eviction, layer.method.config)
        states.append(state)
    for name, value in states[0].items():
        torch.testing.assert_close(value, states[1][name], atol=1e-6, rtol=1e-6, msg=name)
