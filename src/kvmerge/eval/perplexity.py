"""Streaming perplexity: a text goes through one bounded cache and every next token is scored.

This is the StreamingLLM/CaM protocol. With the ``step`` schedule and ``chunk=1`` the result is
that of feeding the text one token at a time; the text is nevertheless given to the model in
segments of ``segment`` tokens, because the cache runs a forward call in steps of ``chunk``
tokens internally and so gives the same result (see :mod:`kvmerge.cache`) much faster.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.functional import cross_entropy
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvmerge import make_cache
from kvmerge.compat import with_cache
from kvmerge.config import CompressionConfig
from kvmerge.method import Method
from kvmerge.registry import method_settings


def require_step_schedule(method: Method) -> None:
    """Teacher-forced scoring (perplexity, loglikelihood, attention error) runs a whole text in one
    forward call; a ``prefill``-schedule method compresses only after it, so every token would be
    scored with the full cache: refuse it with a clear error."""
    if method.config.schedule != "step":
        raise ValueError(
            f"{method.name} compresses once after a prompt (schedule='prefill'): teacher-forced scoring would "
            "see the full cache for every token; evaluate it with generation (needle, summarization)"
        )


@dataclass
class PerplexityRun:
    """A validated perplexity evaluation, ready to :meth:`run` (each run uses a fresh cache); build it
    with :func:`prepare_perplexity`.

    ``ids`` is ``[1, tokens]`` on the model's device; ``cache_options`` are :func:`kvmerge.make_cache`'s
    arguments; ``info`` is the configuration part of the result.
    """

    model: PreTrainedModel
    ids: torch.Tensor
    cache_options: dict
    segment: int
    info: dict

    def run(self, progress: bool = True) -> dict:
        """Score every next token; returns :attr:`info` plus ``ppl``, ``nll`` (mean, nats), ``kv_bytes``,
        ``kv_bytes_full``, ``stats_bytes``, ``kept_tokens``, ``seconds`` (compute only) and ``threads``
        (torch CPU threads)."""
        tokens = self.ids.shape[1]
        cache = make_cache(self.model, **self.cache_options)
        nll_sum = torch.zeros((), dtype=torch.float64)
        bar = tqdm(total=tokens, desc=self.info["method"], unit="tok", file=sys.stderr, disable=not progress)
        start_time = time.perf_counter()
        with torch.inference_mode(), bar:
            for start in range(0, tokens, self.segment):
                logits = self.model(self.ids[:, start : start + self.segment], **with_cache(self.model, cache)).logits
                targets = self.ids[0, start + 1 : start + self.segment + 1]
                # logits[0, i] predicts the token after input i; the last token of the text predicts nothing.
                nll_sum += cross_entropy(logits[0, : targets.shape[0]].float(), targets, reduction="sum").double().cpu()
                bar.update(logits.shape[1])
        seconds = time.perf_counter() - start_time
        nll = nll_sum.item() / (tokens - 1)
        return {
            **self.info,
            "ppl": math.exp(nll),
            "nll": nll,
            "kv_bytes": cache.kv_bytes(),
            "kv_bytes_full": cache.kv_bytes_full(),
            "stats_bytes": cache.stats_bytes(),
            "kept_tokens": cache.kept_tokens(),
            "seconds": seconds,
            "threads": torch.get_num_threads(),
        }


def prepare_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    method: str,
    budget: int | float | None = None,
    *,
    tokens: int = 1024,
    chunk: int = 1,
    segment: int = 512,
    seed: int = 0,
    **options,
) -> PerplexityRun:
    """Validate everything and tokenize; no model compute. Arguments as :func:`streaming_perplexity`.

    Raises
    ------
    ValueError, TypeError
        Bad ``tokens``/``segment``, method, budget or options, or a text shorter than ``tokens``.
    """
    _check_count("tokens", tokens, minimum=2)
    _check_count("segment", segment, minimum=1)
    CompressionConfig(budget=budget)  # validates the budget as given, before it is turned into a count
    budget_tokens = math.ceil(budget * tokens) if isinstance(budget, float) else budget
    cache_options = {"method": method, "budget": budget_tokens, "chunk_size": chunk, "seed": seed, **options}
    require_step_schedule(make_cache(model, **cache_options).method)  # validates the method and every option
    ids = token_ids(tokenizer, text, tokens).to(model.device)
    info = {
        "method": method,
        "budget": budget,
        "budget_tokens": budget_tokens,
        "model": model_name(model),
        "tokens": tokens,
        "chunk": chunk,
        "segment": segment,
        "seed": seed,
        **({"options": options} if options else {}),
        "settings": method_settings(method, options),
    }
    return PerplexityRun(model, ids, cache_options, segment, info)


def streaming_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    method: str,
    budget: int | float | None = None,
    *,
    tokens: int = 1024,
    chunk: int = 1,
    segment: int = 512,
    seed: int = 0,
    progress: bool = True,
    **options,
) -> dict:
    """Perplexity of the first ``tokens`` tokens of ``text`` through one ``method`` cache.

    Parameters
    ----------
    model, tokenizer:
        A causal LM and its tokenizer (e.g. from :func:`kvmerge.load_model`).
    text:
        The text; only its first ``tokens`` tokens are used (the BOS token included, prepended when
        the tokenizer has one and does not add it itself).
    method:
        A method string, see :func:`kvmerge.method_names`.
    budget:
        Entries kept per KV head: an ``int``, or a ``float`` in (0, 1] read as a fraction of ``tokens``
        (``ceil``), the papers' "20% KV cache". ``None`` for ``full``.
    tokens:
        Tokens fed (>= 2); ``tokens - 1`` next-token predictions are scored.
    chunk:
        Tokens per compression step (the cache's ``chunk_size``); 1 = token by token.
    segment:
        Tokens per forward call; does not change the result, only speed and peak memory
        (the logits of a call are ``[1, segment, vocab]``).
    seed:
        Seeds the method's random choices.
    progress:
        Show a tqdm bar on stderr.
    options:
        Other :func:`kvmerge.make_cache` options (``sink``, ``recent``, ``merge_window``, ...).

    Returns
    -------
    dict
        ``method``, ``budget`` (as given), ``budget_tokens``, ``model``, ``tokens``, ``chunk``,
        ``segment``, ``seed``, ``ppl`` = exp(``nll``), ``nll`` (mean over ``tokens - 1`` predictions,
        nats), ``kv_bytes`` (K/V held at the end), ``kv_bytes_full`` (a full cache's), ``stats_bytes``,
        ``kept_tokens`` (entries per head), ``seconds`` (compute) and ``threads`` (torch CPU threads), plus
        ``options`` if any were given.
    """
    run = prepare_perplexity(
        model, tokenizer, text, method, budget, tokens=tokens, chunk=chunk, segment=segment, seed=seed, **options
    )
    return run.run(progress=progress)


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str, tokens: int) -> torch.Tensor:
    """The first ``tokens`` ids of ``text`` as ``[1, tokens]``, starting with BOS if the tokenizer has one."""
    ids = tokenizer(text).input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    if len(ids) < tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the {tokens} requested; lower tokens")
    return torch.tensor([ids[:tokens]])


def model_name(model: PreTrainedModel) -> str:
    """A short name: the directory name of a local checkpoint, else the hub id, else the class name."""
    name = model.name_or_path
    if not name:
        return type(model).__name__
    return Path(name).name if Path(name).is_dir() else name


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
