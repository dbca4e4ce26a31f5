"""What every measurement of ``kvmerge bench`` shares: the model loaded once per process, the prompt
text, the cache of a benchmarked method, and the process's memory as the OS counts it."""

from __future__ import annotations

import contextlib
import gc
import math

import torch

TEXT = "pg-essays"
SEQUENCE_OFFSET = 997  # sequence b of a batch starts b * 997 tokens into the text

_MODELS: dict[str, tuple] = {}


def bench_model(name: str):
    """The model and tokenizer ``name``, loaded once per process (attention reset to SDPA)."""
    import kvmerge

    if name not in _MODELS:
        _MODELS[name] = kvmerge.load_model(name)
    model, tokenizer = _MODELS[name]
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    return model, tokenizer


def text_ids(tokenizer, tokens: int) -> torch.Tensor:
    """The first ``tokens`` token ids of the Paul Graham essays (repeated if the text is shorter)."""
    from kvmerge.eval.data import load_text

    text = load_text(TEXT)[: 8 * tokens + 1000]  # >= 2 tokens per 8 characters: enough, and fast to tokenize
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids.repeat(math.ceil(tokens / ids.numel()))[:tokens]


def bench_prompt(tokenizer, context: int, batch: int) -> torch.Tensor:
    """``[batch, context]`` token ids: sequence b starts ``b * 997`` tokens into the essays."""
    ids = text_ids(tokenizer, context + (batch - 1) * SEQUENCE_OFFSET)
    return torch.stack([ids[b * SEQUENCE_OFFSET : b * SEQUENCE_OFFSET + context] for b in range(batch)])


def bench_cache(model, method: str, budget: int | None, options: dict):
    """``DynamicCache`` for ``full``, else a kvmerge cache with ``options``."""
    from transformers import DynamicCache

    import kvmerge

    if method == "full":
        return DynamicCache(config=model.config)
    return kvmerge.make_cache(model, method, budget, **options)


def _status(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    """Resident set size now (bytes; 0 where ``/proc`` is missing)."""
    with contextlib.suppress(OSError):
        return _status("VmRSS")
    return 0


def peak_rss() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (bytes)."""
    with contextlib.suppress(OSError):
        return _status("VmHWM")
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_memory() -> int:
    """Collect garbage, hand freed heap pages back to the OS (glibc ``malloc_trim``), reset the peak-RSS
    mark; returns the RSS, which is then what the process really holds."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return reset_peak_rss()


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs``); returns the RSS."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return rss()
