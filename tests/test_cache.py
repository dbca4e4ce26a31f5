"""The cache's common semantics: memory, batches, schedules, determinism, generation, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

import kvmerge
from tests.conftest import VOCAB, tiny_model
from tests.test_oracle import masked_reference, record_evictions


def ids_of(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, method: str, ids: torch.Tensor, **options) -> tuple[torch.Tensor, kvmerge.KVMergeCache]:
    cache = kvmerge.make_cache(model, method, **options)
    with torch.no_grad():
        return model(ids, **kvmerge.with_cache(model, cache)).logits, cache


@pytest.mark.parametrize("method", ["streaming", "h2o+cam", "scissorhands", "tova+cam"])
def test_memory_accounting_is_exact(llama, method):
    _, cache = run(llama, method, ids_of(50, batch=2), budget=12, chunk_size=4)
    config = llama.config
    per_entry = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4  # K+V fp32
    layers = config.num_hidden_layers
    assert cache.kept_tokens() == 12
    assert cache.kv_bytes() == layers * 2 * 12 * per_entry
    assert cache.kv_bytes_full() == layers * 2 * 50 * per_entry
    for layer in cache.layers:
        assert layer.keys.shape[-2] == layer.values.shape[-2] == 12
        assert all(value.shape[-1] == 12 for value in layer.stats.values())
    # positions and statistics beside the entries stay small (int64 position + at most one 8-byte statistic)
    assert cache.stats_bytes() <= layers * 2 * 12 * config.num_key_value_heads * 16


def test_full_cache_accounting_matches_dynamic_cache(llama):
    ids = ids_of(20)
    logits, cache = run(llama, "full", ids)
    dynamic = DynamicCache(config=llama.config)
    with torch.no_grad():
        reference = llama(ids, **kvmerge.with_cache(llama, dynamic)).logits
    held = sum(t.numel() * t.element_size() for layer in dynamic.layers for t in (layer.keys, layer.values))
    assert cache.kv_bytes() == cache.kv_bytes_full() == held > 0
    assert cache.get_seq_length() == dynamic.get_seq_length() == 20
    assert torch.equal(logits, reference)


def left_padded_batch(lengths: list[int]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    sequences = [ids_of(n, seed=i) for i, n in enumerate(lengths)]
    longest = max(lengths)
    batch = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, sequence in enumerate(sequences):
        batch[row, longest - sequence.shape[1] :] = sequence[0]
        mask[row, longest - sequence.shape[1] :] = 1
    return sequences, batch, mask


def generate(model, ids, cache, mask=None):
    out = model.generate(
        ids,
        attention_mask=mask,
        **kvmerge.with_cache(model, cache),
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return torch.stack(out.logits, dim=1), out.sequences


PREFILL_ONLY = ("snapkv", "kvmerger")


@pytest.mark.parametrize(
    "method",
    ["full", "streaming", "h2o+cam", "scissorhands+cam", "tova", "corm", "random+cam", "knorm", "snapkv+kvmerger"],
)
@pytest.mark.parametrize("budget", [10, 0.5])
def test_sequence_in_batch_equals_sequence_alone(llama, method, budget):
    schedule = {"schedule": "prefill", "decode_interval": 3} if any(m in method for m in PREFILL_ONLY) else {}
    options = {} if method == "full" else {"budget": budget, "chunk_size": 3, **schedule}
    sequences, batch, mask = left_padded_batch([30, 22, 17])
    batched, batch_tokens = generate(llama, batch, kvmerge.make_cache(llama, method, **options), mask)
    for row, sequence in enumerate(sequences):
        alone, alone_tokens = generate(llama, sequence, kvmerge.make_cache(llama, method, **options))
        torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batch_tokens[row, -8:], alone_tokens[0, -8:])


def test_padding_is_never_kept(llama):
    _, batch, mask = left_padded_batch([30, 12])
    cache = kvmerge.make_cache(llama, "h2o", budget=10, chunk_size=2)
    with torch.no_grad():
        llama(batch, attention_mask=mask, **kvmerge.with_cache(llama, cache))
    for layer in cache.layers:
        assert sorted(layer.index[1, 0].tolist()) == sorted(layer.index[1, 1].tolist())
        assert (layer.index >= 0).all()  # both sequences are over budget: only real tokens are held
        assert int(layer.index[1].max()) == 11


@pytest.mark.parametrize(
    "method",
    ["h2o+cam", "streaming+cam", "scissorhands+cam", "tova", "corm+cam", "random", "knorm+cam", "snapkv+kvmerger"],
)
def test_same_seed_same_result(llama, method):
    ids = ids_of(60)
    schedule = {"schedule": "prefill"} if any(m in method for m in PREFILL_ONLY) else {"chunk_size": 1}
    first, _ = run(llama, method, ids, budget=16, seed=3, **schedule)
    again, _ = run(llama, method, ids, budget=16, seed=3, **schedule)
    assert torch.equal(first, again)


@pytest.mark.parametrize("method", ["h2o+cam", "random"])
def test_another_seed_changes_what_draws_randomly(llama, method):
    ids, options = ids_of(60), {"budget": 16, "chunk_size": 1}
    options |= {"gate": "bernoulli"} if method.endswith("+cam") else {}
    first, _ = run(llama, method, ids, seed=3, **options)
    other, _ = run(llama, method, ids, seed=4, **options)
    assert (first - other).abs().max() > 1e-4


def test_the_expected_gate_ignores_the_seed(llama):
    ids = ids_of(60)
    first, _ = run(llama, "h2o+cam", ids, budget=16, chunk_size=1, seed=3)
    other, _ = run(llama, "h2o+cam", ids, budget=16, chunk_size=1, seed=4)
    assert torch.equal(first, other)


def test_prefill_schedule_compresses_once_then_appends(llama):
    cache = kvmerge.make_cache(llama, "h2o", budget=10, schedule="prefill")
    with torch.no_grad():
        llama(ids_of(40), **kvmerge.with_cache(llama, cache))
        assert cache.kept_tokens() == 10
        for token in range(5):
            llama(ids_of(1, seed=token), **kvmerge.with_cache(llama, cache))
    assert cache.kept_tokens() == 15
    assert cache.get_seq_length() == 45


def test_prefill_schedule_with_decode_interval(llama):
    cache = kvmerge.make_cache(llama, "tova", budget=10, schedule="prefill", decode_interval=4)
    sizes = []
    with torch.no_grad():
        llama(ids_of(40), **kvmerge.with_cache(llama, cache))
        for token in range(8):
            llama(ids_of(1, seed=token), **kvmerge.with_cache(llama, cache))
            sizes.append(cache.kept_tokens())
    assert sizes == [11, 12, 13, 10, 11, 12, 13, 10]


def test_fraction_budget_is_a_fraction_of_the_prompt(llama):
    _, cache = run(llama, "streaming", ids_of(40), budget=0.25, chunk_size=1)
    assert cache.kept_tokens() == 10


def test_generate_runs_in_a_fixed_budget(llama):
    cache = kvmerge.make_cache(llama, "h2o+cam", budget=16, chunk_size=8)
    out = llama.generate(
        ids_of(40), **kvmerge.with_cache(llama, cache), max_new_tokens=30, do_sample=False, pad_token_id=0
    )
    assert out.shape == (1, 70)
    assert cache.kept_tokens() == 16
    assert cache.get_seq_length() == 69


@pytest.mark.parametrize("position_shift", [False, True])
def test_true_positions_survive_eviction(monkeypatch, llama, position_shift):
    """Decoding after eviction uses true positions: the same as full attention, at true positions, over
    exactly the kept keys; StreamingLLM's position shift (keys re-rotated to sit contiguously) is not."""
    ids = ids_of(30)
    log = record_evictions(monkeypatch)
    cache = kvmerge.make_cache(llama, "streaming", budget=12, chunk_size=1, position_shift=position_shift)
    with torch.no_grad():
        llama(ids[:, :29], **kvmerge.with_cache(llama, cache))
        last = llama(ids[:, 29:], **kvmerge.with_cache(llama, cache)).logits
    assert sorted(cache.layers[0].index[0, 0].tolist()) == [0, 1, 2, 3, *range(22, 30)]  # 18 entries evicted
    reference = masked_reference(llama, ids, log)[:, -1:]
    if position_shift:
        assert (last - reference).abs().max() > 1e-3
    else:
        torch.testing.assert_close(last, reference, atol=1e-5, rtol=1e-5)


def test_model_families_all_compress(family_model):
    model = family_model
    logits, cache = run(model, "h2o+cam", ids_of(40), budget=8, chunk_size=2)
    assert cache.kept_tokens() == 8
    assert torch.isfinite(logits).all()


@pytest.fixture(params=["llama", "mistral", "qwen2", "opt", "gpt_neox"])
def family_model(request):
    return tiny_model(request.param)


# ---- errors, raised before any compute --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "budget", "options", "error", "message"),
    [
        ("h2o2", 10, {}, ValueError, "valid methods: full, streaming"),
        ("h2o+zip", 10, {}, ValueError, "valid absorbers: cam"),
        ("full+cam", 10, {}, ValueError, "never evicts"),
        ("h2o", None, {}, ValueError, "needs a budget"),
        ("h2o", 0, {}, ValueError, "budget must be > 0"),
        ("h2o", -3, {}, ValueError, "budget must be > 0"),
        ("h2o", 1.5, {}, ValueError, "fraction in (0, 1]"),
        ("h2o", 0.0, {}, ValueError, "fraction in (0, 1]"),
        ("h2o", "ten", {}, ValueError, "invalid budget 'ten'"),
        ("h2o", [10], {}, TypeError, "budget must be an int"),
        ("full", 0.2, {}, ValueError, "takes no budget"),
        ("streaming", 3, {}, ValueError, "raise the budget to at least 4"),
        ("h2o", 10, {"sink": 12}, ValueError, "raise the budget to at least 12"),
        ("h2o", 10, {"recent": 11}, ValueError, "raise the budget to at least 11"),
        ("h2o", True, {}, TypeError, "budget must be an int"),
        ("streaming", 10, {"sink": 4, "recent": 8}, ValueError, "exceeds the budget"),
        ("h2o", 10, {"schedule": "always"}, ValueError, "schedule must be"),
        ("h2o", 10, {"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
        ("h2o", 10, {"decode_interval": 4}, ValueError, "'prefill' schedule only"),
        ("h2o", 10, {"gqa": "median"}, ValueError, "gqa must be one of"),
        ("h2o", 10, {"merge_window": 0}, ValueError, "merge_window must be >= 1"),
        ("h2o", 10, {"history_window": 64}, ValueError, "history_window must be in [1, 62]"),
        ("h2o", 10, {"seed": 1.5}, TypeError, "seed must be an int"),
        (
            "h2o",
            10,
            {"heavy": 5},
            TypeError,
            "takes no option(s) heavy; its own options: none; options every method takes: sink",
        ),
        (3, 10, {}, TypeError, "method must be a string"),
    ],
)
def test_bad_input_is_a_clear_error(llama, method, budget, options, error, message):
    with pytest.raises(error) as info:
        kvmerge.make_cache(llama, method, budget, **options)
    assert message in str(info.value)


def test_a_fraction_below_the_sinks_is_raised_to_them_with_a_warning(llama):
    with pytest.warns(UserWarning, match=r"budget 0.05 of a prompt under 80 tokens .* the 4 entries .* raised to 4"):
        _, cache = run(llama, "streaming", ids_of(40), budget=0.05)
    assert cache.kept_tokens() == 4  # the sinks alone
    with pytest.warns(UserWarning, match="budget 0.2 of a prompt under 160 tokens keeps fewer than 32 entries"):
        run(llama, "h2o", ids_of(40), budget=0.2)


def test_a_fraction_that_keeps_enough_does_not_warn(llama):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(llama, "h2o", ids_of(200), budget=0.2, chunk_size=16)


def test_string_budgets_read_as_the_cli_reads_them(llama):
    assert kvmerge.make_method("h2o", "20%").config.budget == 0.2
    assert kvmerge.make_method("h2o", "0.2").config.budget == 0.2
    assert kvmerge.make_method("h2o", "256").config.budget == 256


def test_unsupported_attention_and_sliding_window_models():
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attention implementation 'flash_attention_2' is not supported"):
        kvmerge.make_cache(model, "h2o", 10)
    mistral = tiny_model("mistral")
    mistral.config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding-window"):
        kvmerge.make_cache(mistral, "h2o", 10)


def test_foreign_attention_is_detected(llama):
    cache = kvmerge.make_cache(llama, "h2o", 10)
    llama.set_attn_implementation("sdpa")
    try:
        with pytest.raises(RuntimeError, match="did not go through kvmerge"), torch.no_grad():
            llama(ids_of(5), **kvmerge.with_cache(llama, cache))
    finally:
        llama.set_attn_implementation("kvmerge")


# ---- StreamingLLM position shift ---------------------------------------------------------------------------------


def test_key_rotation_composes_with_rope(llama):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvmerge.positions import KeyRotation

    raw = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    rotary = llama.model.rotary_emb

    def at(positions):
        cos, sin = rotary(raw, torch.tensor([positions]))
        return apply_rotary_pos_emb(raw, raw, cos, sin)[1]

    shifted = KeyRotation.from_model(llama).rotate(
        at([3, 9, 20, 21, 40]), torch.tensor([[-3, -5, 7, 0, -39]] * 2)[None]
    )
    torch.testing.assert_close(shifted, at([0, 4, 27, 21, 1]), atol=1e-5, rtol=1e-5)


def test_position_shift_places_kept_keys_contiguously_before_the_next_token(llama):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ids = ids_of(50)
    _, cache = run(llama, "streaming", ids, budget=12, chunk_size=1, position_shift=True)
    attention = llama.model.layers[0].self_attn
    with torch.no_grad():  # layer 0's unrotated keys depend only on the embeddings
        hidden = llama.model.layers[0].input_layernorm(llama.model.embed_tokens(ids))
        raw = attention.k_proj(hidden).view(1, 50, -1, attention.head_dim).transpose(1, 2)
    kept = [0, 1, 2, 3, *range(42, 50)]
    cos, sin = llama.model.rotary_emb(raw, torch.arange(38, 50)[None])
    expected = apply_rotary_pos_emb(raw[:, :, kept], raw[:, :, kept], cos, sin)[1]
    torch.testing.assert_close(cache.layers[0].keys, expected, atol=1e-5, rtol=1e-5)


def test_position_shift_is_identity_without_eviction(llama):
    ids = ids_of(20)
    shifted, _ = run(llama, "streaming+cam", ids, budget=20, chunk_size=1, position_shift=True)
    with torch.no_grad():
        torch.testing.assert_close(shifted, llama(ids).logits, atol=1e-5, rtol=1e-5)


def test_position_shift_needs_rope():
    with pytest.raises(ValueError, match="needs rotary position embeddings"):
        kvmerge.make_cache(tiny_model("opt"), "streaming", 10, position_shift=True)


def test_a_compressed_cache_cannot_be_cropped(llama):
    cache = kvmerge.make_cache(llama, "h2o", budget=8, chunk_size=4)
    with torch.no_grad():
        llama(ids_of(20), **kvmerge.with_cache(llama, cache))
    with pytest.raises(RuntimeError, match="cannot be rolled back"):
        cache.crop(10)
