"""``kvmerge bench --compare-kvpress``: kvpress's presses next to kvmerge's methods on the same model,
text and kept budget (perplexity of a continuation, prefill seconds, decode ms/token)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from kvmerge.absorbers.cam import PAPER_RULE
from kvmerge.compat import with_cache
from kvmerge.eval.measure import bench_cache, bench_model, text_ids


# kvpress comparison: name -> (kvmerge method, kvmerge options, kvpress press factory(compression_ratio, kept))
def _kvpress_pairs() -> dict[str, tuple[str, dict, Callable]]:
    import kvpress

    return {
        "streaming": (
            "streaming",
            {"schedule": "prefill"},
            lambda ratio, kept: kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4),
        ),
        "tova": ("tova", {"schedule": "prefill"}, lambda ratio, kept: kvpress.TOVAPress(compression_ratio=ratio)),
        "snapkv": (
            "snapkv",
            {"schedule": "prefill", "window": 32, "kernel": 5},
            lambda ratio, kept: kvpress.SnapKVPress(compression_ratio=ratio, window_size=32, kernel_size=5),
        ),
        "cam": (
            "streaming+cam",
            # kvpress's CAMPress is Eq. 14 as printed: compare the same rule, not kvmerge's default
            {"schedule": "prefill", "decode_interval": 1, "merge_window": 16, **PAPER_RULE},
            lambda ratio, kept: kvpress.CAMPress(
                base_press=kvpress.StreamingLLMPress(),
                compression_interval=1,
                target_size=kept,
                merge_budget=16,
                hidden_states_buffer_size=0,
            ),
        ),
    }


def kvpress_version() -> str | None:
    """The installed kvpress version, or ``None`` when it cannot be imported."""
    if importlib.util.find_spec("kvpress") is None:
        return None
    try:
        return importlib.metadata.version("kvpress")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def compare_kvpress(
    model_name: str, context: int, budget: int, tokens: int, threads: int = 1, presses: tuple[str, ...] | None = None
) -> list[dict]:
    """The presses kvpress and kvmerge share, on the same model, text and kept budget.

    The first ``context`` tokens of the essays are the prompt; ``budget`` entries per KV head are kept
    (kvpress: ``compression_ratio`` chosen so that it keeps exactly ``budget``); then the next
    ``tokens`` tokens are fed one at a time (teacher forcing, true positions) and scored. Both sides
    compress once after the prompt (kvmerge's ``prefill`` schedule, kvpress's prefill presses); CaM
    compresses after every new token on both sides (kvpress's ``CAMPress`` with
    ``compression_interval=1`` over ``StreamingLLMPress``; kvmerge's ``streaming+cam`` with
    ``decode_interval=1``). The full cache is the reference.
    """
    import kvpress  # noqa: F401  (a clear ImportError before any work)

    torch.set_num_threads(threads)
    model, tokenizer = bench_model(model_name)
    ids = text_ids(tokenizer, context + tokens + 1).view(1, -1)
    ratio = 1 - (budget + 0.5) / context  # kvpress keeps int(context * (1 - ratio)) = budget
    pairs = _kvpress_pairs()
    runs: list[tuple[str, str, Callable]] = [("full", "full", lambda: _run_scored(model, ids, context, None, None))]
    for name in presses or tuple(pairs):
        method, options, factory = pairs[name]
        runs.append(
            (
                "kvmerge",
                name,
                lambda m=method, o=options: _run_scored(model, ids, context, bench_cache(model, m, budget, o), None),
            )
        )
        runs.append(("kvpress", name, lambda f=factory: _run_scored(model, ids, context, None, f(ratio, budget))))
    records = []
    for library, name, run in runs:
        torch.manual_seed(0)
        records.append(
            {"library": library, "press": name, "context": context, "budget": budget, "tokens": tokens, **run()}
        )
    return records


@contextlib.contextmanager
def _cache_position_kwarg(model):
    """Pass ``cache_position`` to every attention layer, as transformers < 5.3 did and kvpress 0.5 reads
    (its hooks test ``cache_position[-1] + 1 == q_len`` to tell prefill from decoding): the cache's
    length before the call plus ``arange(q_len)``; and the cache as ``past_key_values``, the name it had
    before transformers 5.24 and that kvpress 0.5 reads."""

    def add(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # its name by transformers version
        if cache is not None:
            kwargs.setdefault("past_key_values", cache)  # kvpress 0.5's hooks read this name
        if "cache_position" not in kwargs:
            length = kwargs["hidden_states"].shape[1]
            past = cache.get_seq_length(module.layer_idx) if cache is not None else 0
            kwargs["cache_position"] = torch.arange(past, past + length, device=kwargs["hidden_states"].device)
        return args, kwargs

    hooks = [layer.self_attn.register_forward_pre_hook(add, with_kwargs=True) for layer in model.model.layers]
    try:
        with warnings.catch_warnings():  # transformers warns that both names are given: both are the cache
            warnings.filterwarnings("ignore", message="Both `past_key_values` and `cache` are set")
            yield
    finally:
        for hook in hooks:
            hook.remove()


def _is_decoding_press(press) -> bool:
    """Whether a kvpress press compresses while decoding (``DecodingPress`` and its subclasses, CaM's)."""
    import kvpress

    return isinstance(press, kvpress.DecodingPress)


def _run_scored(model, ids: torch.Tensor, context: int, cache, press) -> dict:
    """Prefill ``ids[:, :context]`` (through ``press`` if given), then score the rest token by token."""
    from transformers import DynamicCache

    import kvmerge

    if cache is None:
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    decoding_press = press is not None and _is_decoding_press(press)
    prefill_press = press(model) if press is not None and not decoding_press else contextlib.nullcontext()
    decode_press = press(model) if decoding_press else contextlib.nullcontext()
    nll, timings = [], []
    with torch.inference_mode(), _cache_position_kwarg(model) if press is not None else contextlib.nullcontext():
        started = time.perf_counter()
        with prefill_press:
            logits = model(ids[:, :context], **with_cache(model, cache), logits_to_keep=1).logits
        prefill = time.perf_counter() - started
        with decode_press:
            for t in range(context, ids.shape[1] - 1):
                nll.append(float(torch.nn.functional.cross_entropy(logits[:, -1].float(), ids[:, t])))
                started = time.perf_counter()
                position = None if isinstance(cache, kvmerge.KVMergeCache) else torch.tensor([[t]])
                logits = model(ids[:, t : t + 1], **with_cache(model, cache), position_ids=position).logits
                timings.append(time.perf_counter() - started)
    nll.append(float(torch.nn.functional.cross_entropy(logits[:, -1].float(), ids[:, -1])))
    kept = cache.layers[0].keys.shape[-2]
    held = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return {
        "ppl": math.exp(statistics.fmean(nll)),
        "nll": statistics.fmean(nll),
        "prefill_seconds": prefill,
        "decode_ms": 1000 * statistics.median(timings),
        "kept_per_head": kept,
        "kv_bytes": held,
    }
