"""The real SmolLM2-135M-Instruct (GQA: 9 query / 3 KV heads, 30 layers) on real text."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvmerge
from tests.test_oracle import masked_reference, record_evictions

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
    reference = masked_reference(model, ids, log)
    torch.testing.assert_close(ours, reference, atol=2e-4, rtol=1e-4)


def test_generate_in_a_fifth_of_the_memory(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Write two sentences about the sea."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    cache = kvmerge.make_cache(model, "h2o+cam", budget=0.2, chunk_size=8)
    out = model.generate(ids, **kvmerge.with_cache(model, cache), max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert len(text.split()) >= 5
    budget = -(-ids.shape[1] // 5)
    assert cache.kept_tokens() == budget
    assert cache.kv_bytes() < 0.5 * cache.kv_bytes_full()


def test_left_padded_batch_equals_alone(smollm2):
    model, tokenizer = smollm2
    prompts = [TEXT, "Paris is the capital of"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
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
