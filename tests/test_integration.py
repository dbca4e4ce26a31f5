"""The real SmolLM2-135M-Instruct (GQA: 9 query / 3 KV heads, 30 layers) on real text."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvmerge
from tests.test_oracle import evicted_count, masked_reference, record_evictions

pytestmark = pytest.mark.integration

TEXT = (
    "The most important thing to understand about startups is that they are designed to grow fast. "
    "Being newly founded does not in itself make a company a startup. Nor is it necessary for a startup "
    "to work on technology, or take venture funding, or have some sort of exit."
)


@pytest.fixture(scope="module")
def model_and_ids(smollm2):
    model, tokenizer = smollm2
    return model, tokenizer(TEXT, return_tensors="pt").input_ids


def test_default_model_is_smollm2_with_gqa(smollm2):
    model, _ = smollm2
    config = model.config
    assert (config.model_type, config.num_hidden_layers) == ("llama", 30)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)


def test_full_matches_dynamic_cache_bit_for_bit(model_and_ids):
    model, ids = model_and_ids
    with torch.no_grad():
        reference = model(ids, **kvmerge.with_cache(model, DynamicCache(config=model.config))).logits
        ours = model(ids, **kvmerge.with_cache(model, kvmerge.make_cache(model, "full"))).logits
    assert torch.equal(reference, ours)


@pytest.mark.parametrize("method", ["h2o+cam", "tova", "scissorhands+cam", "streaming"])
def test_budget_at_least_length_is_identity(model_and_ids, method):
    model, ids = model_and_ids
    with torch.no_grad():
        reference = model(ids).logits
        ours = model(
            ids, **kvmerge.with_cache(model, kvmerge.make_cache(model, method, budget=ids.shape[1], chunk_size=8))
        ).logits
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["h2o", "tova"])
def test_eviction_equals_masked_full_attention(monkeypatch, model_and_ids, method):
    model, ids = model_and_ids
    log = record_evictions(monkeypatch)
    with torch.no_grad():
        ours = model(
            ids, **kvmerge.with_cache(model, kvmerge.make_cache(model, method, budget=16, chunk_size=1))
        ).logits
    assert evicted_count(log) >= 30 * 3 * (ids.shape[1] - 16)  # every layer and KV head evicted what is over budget
    reference = masked_reference(model, ids, log)
    torch.testing.assert_close(ours, reference, atol=2e-4, rtol=1e-4)
    assert (ours - model(ids).logits).abs().max() > 1e-2  # and the eviction changed the logits


def test_generate_in_a_fifth_of_the_memory(smollm2):
    """A fifth of a real prompt's cache (153 tokens -> 31 entries) still writes fluent text: StreamingLLM +
    CaM the full cache's very answer, H2O + CaM no degenerate loop (measured: its half-budget recent
    window loses the question's start, and it answers another question)."""
    model, tokenizer = smollm2
    question = "Which city is the capital of France? Answer in one sentence."
    messages = [{"role": "user", "content": f"{TEXT} {TEXT}\n\n{question}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]

    def answer(method: str, budget: float | None) -> tuple[str, kvmerge.KVMergeCache]:
        cache = kvmerge.make_cache(model, method, budget, **({"chunk_size": 8} if budget else {}))
        out = model.generate(ids, **kvmerge.with_cache(model, cache), max_new_tokens=24, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), cache

    full, _ = answer("full", None)
    assert "Paris" in full
    streaming, cache = answer("streaming+cam", 0.2)
    assert streaming == full
    assert cache.kept_tokens() == -(-ids.shape[1] // 5) and cache.kv_bytes() * 4 < cache.kv_bytes_full()
    h2o, _ = answer("h2o+cam", 0.2)
    words = h2o.lower().split()
    assert len(words) >= 8 and len(set(words)) >= 0.7 * len(words), h2o  # no "the the the"


def test_left_padded_batch_equals_alone(smollm2):
    model, tokenizer = smollm2
    prompts = [TEXT, "Paris is the capital of France, and the largest city of the country is"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert int(batch.attention_mask.sum(-1).min()) > 12  # both rows evict, the padded one too
    cache = kvmerge.make_cache(model, "h2o+cam", budget=12, chunk_size=4)
    with torch.no_grad():
        batched = model.generate(
            **batch,
            **kvmerge.with_cache(model, cache),
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        seen = batch.attention_mask.sum(-1) + 6 - 1  # tokens each row put through the cache
        assert ((cache.layers[0].index >= 0).sum(-1) == 12).all() and (seen > 12).all()
        for row, prompt in enumerate(prompts):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            alone = model.generate(
                ids,
                **kvmerge.with_cache(model, kvmerge.make_cache(model, "h2o+cam", budget=12, chunk_size=4)),
                max_new_tokens=6,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
            torch.testing.assert_close(
                torch.stack(batched.logits, 1)[row], torch.stack(alone.logits, 1)[0], atol=2e-4, rtol=1e-4
            )
