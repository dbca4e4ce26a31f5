"""The cache on any device and in half precision: ``KVMERGE_TEST_DEVICE=cuda pytest tests/test_device.py``
runs these on a GPU (fp16 and bf16 included); by default they run on the CPU. Every tensor is made on
the device under test, so a CPU-only op or a host copy on a hot path fails here."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvmerge
from tests.conftest import VOCAB, tiny_model
from tests.test_oracle import evicted_count, masked_reference, record_evictions

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# float16 matmuls on the CPU are slow and inexact enough to need wide tolerances: compare by argmax too
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def model_on(device: torch.device, dtype: torch.dtype = torch.float32, family: str = "llama"):
    return tiny_model(family, layers=2).to(device=device, dtype=dtype)


def ids_on(device: torch.device, length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def logits(model, ids, cache, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kvmerge.with_cache(model, cache), **kwargs).logits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["full", "streaming", "h2o+cam", "tova", "scissorhands+cam", "snapkv"])
def test_budget_at_least_length_is_identity(device, dtype, method):
    model, ids = model_on(device, dtype), ids_on(device, 24)
    options = {} if method == "full" else {"budget": 24, **({"schedule": "prefill"} if method == "snapkv" else {})}
    reference = logits(model, ids, DynamicCache(config=model.config))
    ours = logits(model, ids, kvmerge.make_cache(model, method, **options))
    assert ours.device.type == device.type and ours.dtype == dtype
    torch.testing.assert_close(ours, reference, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("method", ["h2o", "tova", "streaming"])
def test_eviction_equals_masked_full_attention(monkeypatch, device, method):
    model, ids = model_on(device), ids_on(device, 32)
    log = record_evictions(monkeypatch)
    ours = logits(model, ids, kvmerge.make_cache(model, method, budget=10, chunk_size=1))
    assert evicted_count(log) > 0
    torch.testing.assert_close(ours, masked_reference(model, ids, log).to(device), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["h2o+cam", "streaming+cam", "tova"])
def test_sequence_in_batch_equals_sequence_alone(device, dtype, method):
    model = model_on(device, dtype)
    lengths, longest = [30, 19], 30
    rows = [ids_on(device, n, seed=i) for i, n in enumerate(lengths)]
    batch = torch.zeros(2, longest, dtype=torch.long, device=device)
    mask = torch.zeros_like(batch)
    for row, ids in enumerate(rows):
        batch[row, longest - ids.shape[1] :], mask[row, longest - ids.shape[1] :] = ids[0], 1

    def generate(ids, attention_mask=None):
        cache = kvmerge.make_cache(model, method, budget=10, chunk_size=3)
        options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "output_logits": True}
        return model.generate(
            ids,
            attention_mask=attention_mask,
            **kvmerge.with_cache(model, cache),
            **options,
            return_dict_in_generate=True,
        )

    batched = generate(batch, mask)
    for row, ids in enumerate(rows):
        alone = generate(ids)
        assert torch.equal(batched.sequences[row, -6:], alone.sequences[0, -6:])
        tolerance = TOLERANCE[dtype]
        torch.testing.assert_close(torch.stack(batched.logits, 1)[row], torch.stack(alone.logits, 1)[0],
                                   atol=tolerance, rtol=tolerance)  # fmt: skip


@pytest.mark.parametrize("gate", ["expected", "bernoulli"])
def test_cam_on_the_device_matches_the_cpu(device, gate):
    """CaM's gate hash, its merges and positions are computed on the device and agree with the CPU."""
    results = []
    for where in (torch.device("cpu"), device):
        model, ids = model_on(where), ids_on(where, 48)
        cache = kvmerge.make_cache(model, "h2o+cam", budget=12, chunk_size=1, gate=gate, seed=5)
        results.append((logits(model, ids, cache).cpu(), cache.layers[0].index.cpu()))
    (cpu_logits, cpu_index), (device_logits, device_index) = results
    assert torch.equal(cpu_index, device_index)
    torch.testing.assert_close(device_logits, cpu_logits, atol=1e-4, rtol=1e-4)


def test_position_shift_on_the_device(device):
    model, ids = model_on(device), ids_on(device, 40)
    cache = kvmerge.make_cache(model, "streaming", budget=12, chunk_size=4, position_shift=True)
    out = logits(model, ids, cache)
    assert torch.isfinite(out).all() and cache.layers[0].keys.device.type == device.type
