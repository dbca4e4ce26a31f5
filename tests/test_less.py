"""LESS: the state formula on hand-made tensors, the identity, and a tiny training run that helps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import kvmerge
from kvmerge.absorbers import less
from kvmerge.cache import KVMergeLayer
from kvmerge.method import Entries, Eviction
from kvmerge.training import attention_output_errors, train_less
from tests.conftest import VOCAB, random_less_kernels, tiny_model

HEAD_DIM = 16


@pytest.fixture(scope="module")
def random_kernels(tmp_path_factory):
    return random_less_kernels(tmp_path_factory.mktemp("less"), layers=3, head_dim=HEAD_DIM)


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
    phis = kernels.phi(query[0]).double()  # [4, 1, R]
    psis = kernels.psi(keys[0]).double()  # [2, 9, R]
    assert bool((phis >= 0).all()) and bool((psis >= 0).all())
    for head in range(4):
        kv = head // 2
        q = query[0, head, 0].double()
        kept_keys = torch.cat([keys[0, kv, kept[kv]], new_key[0, kv]]).double()
        kept_values = torch.cat([values[0, kv, kept[kv]], new_value[0, kv]]).double()
        weights = torch.exp(kept_keys @ q * 0.25)
        phi, psi = phis[head, 0], psis[kv, evicted[kv]]  # [R], [e, R]
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


def test_old_kernels_are_refused(random_kernels, tmp_path):
    meta = json.loads((random_kernels / "config.json").read_text())
    shutil.copy(random_kernels / "kernels.pt", tmp_path / "kernels.pt")
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "format"}))
    with pytest.raises(ValueError, match="older layout: train them again"):
        kvmerge.make_method("h2o+less", 8, kernels=tmp_path)


def test_make_cache_finds_the_kernels_train_less_made(random_kernels, tmp_path, monkeypatch):
    """Without kernels=, the default directory of the model, selector and budget; else one line naming
    the command."""
    monkeypatch.setenv("KVMERGE_CACHE", str(tmp_path))
    model = tiny_model("llama", layers=3)
    model.config._name_or_path = "/somewhere/tiny-llama"
    with pytest.raises(
        FileNotFoundError, match="kvmerge train-less --model /somewhere/tiny-llama --method h2o --budget 8"
    ):
        kvmerge.make_cache(model, "h2o+less", 8)
    directory = less.kernel_dir("/somewhere/tiny-llama", "h2o", 8)
    assert directory == tmp_path / "less" / "tiny-llama-h2o-8"
    shutil.copytree(random_kernels, directory)
    cache = kvmerge.make_cache(model, "h2o+less", 8)
    assert Path(cache.method.absorber.kernels) == directory


TRAINING = dict(sequences=8, tokens=128, epochs=12, batch=2, hidden=32, progress=False)


def test_tiny_training_lowers_its_loss_and_beats_plain_eviction(tmp_path):
    model = tiny_model("llama", layers=2, seed=3)
    ids = torch.randint(0, VOCAB, (1200,), generator=torch.Generator().manual_seed(2))
    run = train_less(model, ids[:1024], "h2o", 16, directory=tmp_path, **TRAINING)
    for curve in run.losses:  # 4 steps an epoch
        assert sum(curve[-4:]) < 0.8 * sum(curve[:4])
    held_out = ids[1024:].view(1, -1)
    plain = attention_output_errors(model, held_out, kvmerge.make_cache(model, "h2o", 16, chunk_size=1))
    less = attention_output_errors(model, held_out, kvmerge.make_cache(model, "h2o+less", 16, chunk_size=1,
                                                                     kernels=tmp_path))  # fmt: skip
    assert sum(less) < sum(plain)


def test_an_interrupted_training_continues_after_its_last_finished_layer(tmp_path, monkeypatch):
    from kvmerge import training

    model = tiny_model("llama", layers=3, seed=3)
    ids = torch.randint(0, VOCAB, (1024,), generator=torch.Generator().manual_seed(2))
    settings = dict(TRAINING, epochs=2)
    whole = train_less(model, ids, "h2o", 16, directory=tmp_path / "whole", **settings)
    train_layer, trained, stop_at = training._train_layer, [], [2]

    def counted(kernels, module, *args):
        if module.layer_idx in stop_at:
            raise KeyboardInterrupt
        trained.append(module.layer_idx)
        return train_layer(kernels, module, *args)

    monkeypatch.setattr(training, "_train_layer", counted)
    with pytest.raises(KeyboardInterrupt):
        train_less(model, ids, "h2o", 16, directory=tmp_path / "cut", **settings)
    assert (tmp_path / "cut" / "progress.pt").is_file() and trained == [0, 1]
    stop_at.clear()
    resumed = train_less(model, ids, "h2o", 16, directory=tmp_path / "cut", **settings)
    assert trained == [0, 1, 2] and resumed.losses == whole.losses
    assert not (tmp_path / "cut" / "progress.pt").exists()
    for ours, theirs in zip(
        less.load_kernels(tmp_path / "cut")[0], less.load_kernels(tmp_path / "whole")[0], strict=True
    ):
        for name, value in ours.state_dict().items():
            torch.testing.assert_close(value, theirs.state_dict()[name], msg=name)
    torch.save({"meta": {"epochs": 9}}, tmp_path / "cut" / "progress.pt")  # another run's unfinished layers
    with pytest.raises(ValueError, match="unfinished training run with other settings"):
        train_less(model, ids, "h2o", 16, directory=tmp_path / "cut", **settings)


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
    keys, values = torch.randn(2, 2, 2, 9, HEAD_DIM, generator=generator)
    index = torch.arange(9).expand(2, 2, 9)
    before = Entries(keys, values, index, {}, torch.tensor([9, 9]), 2)
    slots = torch.randint(0, 9, (2, 2, 1), generator=generator)
    evicted = torch.zeros(2, 2, 9, dtype=torch.bool).scatter_(-1, slots, True)
    states = []
    for given in (slots, None):
        state: dict[str, torch.Tensor] = {}
        for _ in range(2):  # a second eviction adds to the state
            eviction = Eviction(before, before, index, evicted, state, given)
            layer.method.absorber.absorb(eviction, layer.method.config)
        states.append(state)
    for name, value in states[0].items():
        torch.testing.assert_close(value, states[1][name], atol=1e-6, rtol=1e-6, msg=name)
