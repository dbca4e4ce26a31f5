"""Training LESS kernels: per layer, with the model frozen, match the full cache's attention output.

The training windows are run once through the selector's compressed cache with
``record_evictions`` (in batches, token by token) to learn when each position left the cache under
that policy, and through the full model to capture every layer's queries, keys and values (the
teacher), a few layers at a time. A layer's student output for query i is a softmax over the
entries still kept at step i (logits ``q.k / sqrt(d)``) and the entries evicted before i (weights
``phi(q)^T psi(k)``), exactly what the cache computes at inference; the loss is the MSE after the
output projection on the queries that had something evicted, in minibatches of windows over
several epochs (the official recipe, scaled to a CPU). Each finished layer is saved, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import kvmerge
from kvmerge.absorbers.less import LessKernels, save_kernels
from kvmerge.compat import with_cache

PROGRESS_FILE = "progress.pt"  # the finished layers of a run in progress
_NEVER = 1 << 62


@dataclass
class LessTraining:
    """What a training run produced: where the kernels are and each layer's loss curve."""

    directory: Path
    losses: list[list[float]] = field(default_factory=list)  # [layer][step]
    seconds: float = 0.0


def capture_layers(
    model: PreTrainedModel, ids: torch.Tensor, layers: set[int] | None = None
) -> dict[int, tuple[torch.Tensor, ...]]:
    """Run ``ids`` ``[B, L]`` through the full model; return the rotated (q ``[B, Hq, L, d]``, k, v
    ``[B, Hkv, L, d]``) of each layer in ``layers`` (``None``: all), by layer index."""
    captured: dict[int, tuple[torch.Tensor, ...]] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if layers is None or module.layer_idx in layers:
            captured[module.layer_idx] = (query.detach(), key.detach(), value.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("kvmerge_capture", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("kvmerge_capture")
    try:
        with torch.inference_mode():
            model(ids, logits_to_keep=1)
    finally:
        model.set_attn_implementation(previous)
    return dict(sorted(captured.items()))


def eviction_timelines(
    model: PreTrainedModel,
    windows: torch.Tensor,
    method: str,
    budget: int | float,
    batch: int,
    progress: bool,
    **options,
) -> torch.Tensor:
    """When each position of ``windows`` ``[S, L]`` left the cache under ``method`` (token by token):
    ``[layers, S, Hkv, L]``, the step after which it was evicted (``1 << 62``: never)."""
    timelines = []
    for chunk in tqdm(windows.split(batch), desc="eviction timelines", disable=not progress):
        cache = kvmerge.make_cache(model, method, budget, chunk_size=1, record_evictions=True, **options)
        with torch.inference_mode():
            model(chunk, logits_to_keep=1, **with_cache(model, cache))
        per_layer = []
        for layer in cache.layers:
            timeline = torch.full((*layer.evicted_at.shape[:2], windows.shape[1]), _NEVER, dtype=torch.long)
            timeline[..., : layer.evicted_at.shape[-1]] = layer.evicted_at
            per_layer.append(timeline)
        timelines.append(torch.stack(per_layer))
    return torch.cat(timelines, dim=1)


def student_attention(
    kernels: LessKernels, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, evicted_at: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention outputs ``[B, Hq, L, d]`` of the compressed cache with LESS for queries ``[B, Hq, L, d]``
    over keys/values ``[B, Hkv, L, d]`` whose positions left the cache after ``evicted_at``
    ``[B, Hkv, L]``, and the rows ``[B, L]`` that had an eviction before them."""
    group = query.shape[1] // key.shape[1]
    steps = torch.arange(key.shape[2])
    causal = steps.view(-1, 1) >= steps.view(1, -1)  # [i, j]
    kept = causal & (evicted_at.unsqueeze(2) >= steps.view(-1, 1))  # [B, Hkv, i, j]
    absorbed = (causal & ~kept).repeat_interleave(group, 1)
    kept = kept.repeat_interleave(group, 1)
    exact = torch.matmul(query, key.repeat_interleave(group, 1).transpose(-1, -2)) / math.sqrt(query.shape[-1])
    learned = torch.matmul(kernels.phi(query), kernels.psi(key).repeat_interleave(group, 1).transpose(-1, -2))
    logits = torch.where(kept, exact, torch.where(absorbed, (learned + 1e-30).log(), float("-inf")))
    out = torch.matmul(logits.softmax(dim=-1), value.repeat_interleave(group, 1))
    return out, absorbed.any(dim=-1).any(dim=1)


def full_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The teacher: causal attention ``[B, Hq, L, d]`` over every entry."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)


def train_less(
    model: PreTrainedModel,
    ids: torch.Tensor,
    method: str = "h2o",
    budget: int | float = 0.2,
    *,
    directory: Path,
    sequences: int = 128,
    tokens: int = 512,
    epochs: int = 2,
    batch: int = 4,
    hidden: int = 512,
    rank: int = 8,
    learning_rate: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    **options,
) -> LessTraining:
    """Train LESS kernels for ``method`` (a selector) at ``budget`` on token ``ids`` ``[n]``; save them
    to ``directory``.

    ``ids`` are cut into ``sequences`` windows of ``tokens`` tokens; every layer trains for ``epochs``
    passes over them in minibatches of ``batch`` windows (Adam, ``learning_rate``). The teacher is
    held in half precision: ``sequences x tokens x layers x 1,920`` bytes for SmolLM2 (3.8 GB by
    default). A run that finds the finished layers of the same run in ``directory`` continues after
    them. Returns the loss curves (every step's).
    """
    if "+" in method:
        raise ValueError(f"train-less takes a selector (h2o, streaming, ...), got {method!r}")
    kvmerge.make_method(method, budget, **options)  # validate before any compute
    if ids.numel() < sequences * tokens:
        raise ValueError(f"the training text has {ids.numel()} tokens, fewer than {sequences} x {tokens}")
    windows = ids[: sequences * tokens].view(sequences, tokens)
    modules = sorted(
        (m for m in model.modules() if hasattr(m, "o_proj") and hasattr(m, "layer_idx")), key=lambda m: m.layer_idx
    )
    if not modules:
        raise ValueError(f"{type(model).__name__}: no attention module with an o_proj to train against")
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (head_dim, config.num_attention_heads, config.num_key_value_heads, hidden, rank)
    meta = {
        "model": str(getattr(model.config, "_name_or_path", type(model).__name__)),
        "method": method, "budget": budget, "options": options,
        "head_dim": head_dim, "query_heads": shape[1], "kv_heads": shape[2], "hidden": hidden, "rank": rank,
        "sequences": sequences, "tokens": tokens, "epochs": epochs, "batch": batch,
        "learning_rate": learning_rate, "seed": seed,
    }  # fmt: skip
    done = _progress(directory, meta)
    started = time.perf_counter() - done.get("seconds", 0.0)  # an interrupted run's time counts
    timelines = done.get("timelines")
    if timelines is None:
        timelines = eviction_timelines(model, windows, method, budget, batch=16, progress=progress, **options)
    kernels = nn.ModuleList(LessKernels(*shape) for _ in modules)
    for module, state in zip(kernels, done.get("states", []), strict=False):
        module.load_state_dict(state)
    result = LessTraining(directory, list(done.get("losses", [])))
    todo = range(len(result.losses), len(modules))
    teacher = _capture(model, windows, set(todo), batch=16, progress=progress)
    bar = tqdm(total=len(todo) * epochs * math.ceil(sequences / batch), desc="training LESS", disable=not progress)
    for layer_idx in todo:
        torch.manual_seed(seed * 1000 + layer_idx)
        kernels[layer_idx] = LessKernels(*shape)
        curve = _train_layer(
            kernels[layer_idx], modules[layer_idx], teacher.pop(layer_idx), timelines[layer_idx],
            epochs, batch, learning_rate, bar,
        )  # fmt: skip
        result.losses.append(curve)
        bar.set_postfix(layer=layer_idx, loss=f"{curve[-1]:.3g}")
        states = [k.state_dict() for k in kernels[: layer_idx + 1]]
        seconds = time.perf_counter() - started
        saved = {"meta": meta, "timelines": timelines, "states": states, "losses": result.losses, "seconds": seconds}
        torch.save(saved, directory / PROGRESS_FILE)
    bar.close()
    result.seconds = time.perf_counter() - started
    steps = math.ceil(sequences / batch)  # per epoch
    meta |= {
        "seconds": result.seconds,
        "loss_first_epoch": [sum(curve[:steps]) / steps for curve in result.losses],
        "loss_last_epoch": [sum(curve[-steps:]) / steps for curve in result.losses],
    }
    save_kernels(kernels, directory, meta)
    (directory / PROGRESS_FILE).unlink(missing_ok=True)
    return result


def _progress(directory: Path, meta: dict) -> dict:
    """The finished layers of the same run in ``directory`` (``{}``: none; another run's are refused)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / PROGRESS_FILE
    if not path.exists():
        return {}
    saved = torch.load(path, weights_only=False)
    if saved["meta"] != meta:
        changed = sorted(k for k in meta if saved["meta"].get(k) != meta[k])
        raise ValueError(f"{directory} holds an unfinished training run with other settings ({', '.join(changed)}): "
                         "pass --force to start over, or another --out")  # fmt: skip
    return saved


def _capture(
    model: PreTrainedModel, windows: torch.Tensor, layers: set[int], batch: int, progress: bool
) -> dict[int, tuple]:
    """The teacher's (q, k, v) of ``layers`` for every window, each ``[S, heads, L, d]`` in half
    precision, by layer."""
    parts = []
    for chunk in tqdm(windows.split(batch), desc="capturing the full model", disable=not progress):
        parts.append({i: tuple(t.half() for t in qkv) for i, qkv in capture_layers(model, chunk, layers).items()})
    return {i: tuple(torch.cat([p[i][n] for p in parts]) for n in range(3)) for i in layers}


def _train_layer(
    kernels: LessKernels, module: nn.Module, teacher: tuple, timeline: torch.Tensor,
    epochs: int, batch: int, learning_rate: float, bar: tqdm,
) -> list[float]:  # fmt: skip
    """Fit one layer's ``kernels``; the loss of every step."""
    query, key, value = (t.float() for t in teacher)
    weight = module.o_proj.weight.detach()  # the bias cancels in the difference
    optimizer = torch.optim.Adam(kernels.parameters(), lr=learning_rate)
    curve = []
    for _ in range(epochs):
        for rows in torch.randperm(query.shape[0]).split(batch):
            q, k, v, evicted_at = query[rows], key[rows], value[rows], timeline[rows]
            with torch.no_grad():
                target = nn.functional.linear(_heads_last(full_attention(q, k, v)), weight)
            out, has_eviction = student_attention(kernels, q, k, v, evicted_at)
            predicted = nn.functional.linear(_heads_last(out), weight)
            loss = nn.functional.mse_loss(predicted[has_eviction], target[has_eviction])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
            bar.update()
    return curve


def _heads_last(out: torch.Tensor) -> torch.Tensor:
    """``[B, Hq, L, d]`` -> ``[B, L, Hq * d]``, the input of the output projection."""
    return out.transpose(1, 2).flatten(2)


def attention_output_errors(model: PreTrainedModel, ids: torch.Tensor, cache: kvmerge.KVMergeCache) -> list[float]:
    """Per layer, ``||O - O_full|| / ||O_full||`` of the attention outputs (after the output projection)
    when ``ids`` ``[1, L]`` run through ``cache`` instead of the full cache."""
    outputs: dict[int, list[torch.Tensor]] = {}
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    hooks = [
        m.register_forward_hook(lambda m, args, out: outputs.setdefault(m.layer_idx, []).append(out[0]))
        for m in modules
    ]
    try:
        with torch.inference_mode():
            model(ids)
            model(ids, **with_cache(model, cache))
    finally:
        for hook in hooks:
            hook.remove()
    return [float((run[1] - run[0]).norm() / run[0].norm()) for _, run in sorted(outputs.items())]


def less_training_text(data_dir: str | Path | None = None) -> str:
    """Text for training LESS that no evaluation reads: the Paul Graham essays after their first fifth
    and the third quarter of Wikitext-2 test (perplexity, the demo and the needle test read leading
    slices; the last quarter is held out for judging the kernels)."""
    from kvmerge.eval.data import load_text

    essays, wiki = load_text("pg-essays"), load_text("wikitext2", data_dir)
    return essays[len(essays) // 5 :] + "\n\n" + wiki[len(wiki) // 2 : 3 * len(wiki) // 4]


def merged_fraction(layers: list[tuple[torch.Tensor, ...]], similarity: float, recent: int) -> float:
    """Fraction of entries left after KVMerger's merging alone, over all layers and KV heads of one
    captured sequence (the last ``recent`` entries are never merged)."""
    from kvmerge.absorbers.kvmerger import merging_sets

    left, total = 0, 0
    for _, key, _ in layers:
        key = key[0]
        heads, length = key.shape[:2]
        candidates = (torch.arange(length) < length - recent).expand(1, heads, length)
        sets = merging_sets(key.unsqueeze(0), candidates, similarity)[0]
        merged_away = (sets[:, 1:] >= 0) & (sets[:, 1:] == sets[:, :-1])  # members after a set's first
        left += heads * length - int(merged_away.sum())
        total += heads * length
    return left / total


def calibrate_kvmerger(
    model: PreTrainedModel, ids: torch.Tensor, target: float, recent: int = 32, rounds: int = 12
) -> tuple[float, dict[float, float]]:
    """The cosine threshold at which KVMerger's merging alone keeps about ``target`` (a fraction) of
    the entries of ``ids`` ``[1, L]``; bisection, returning the threshold and every (threshold, fraction)
    tried."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target is the fraction of entries to keep, in (0, 1); got {target}")
    layers = list(capture_layers(model, ids).values())
    low, high, tried = -1.0, 1.0, {}
    for _ in range(rounds):
        middle = (low + high) / 2
        tried[middle] = merged_fraction(layers, middle, recent)
        low, high = (middle, high) if tried[middle] < target else (low, middle)
    best = min(tried, key=lambda t: abs(tried[t] - target))
    return best, tried
