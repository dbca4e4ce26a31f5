"""Training LESS kernels: per layer, with the model frozen, match the full cache's attention output.

For each training sequence the full model is run once to capture every layer's queries, keys
and values (the teacher), and once through the selector's compressed cache with
``record_evictions`` to learn when each position left the cache under that policy. A layer's
student output for query i is a softmax over the entries still kept at step i (logits
``q.k / sqrt(d)``) and the entries evicted before i (logits ``log(phi(q)^T psi(k))``), exactly
what the cache computes at inference; the loss is the MSE after the output projection on the
queries that had something evicted.
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
from kvmerge.absorbers.less import LessKernels, pair_logits, save_kernels
from kvmerge.compat import with_cache


@dataclass
class LessTraining:
    """What a training run produced: where the kernels are and each layer's loss curve."""

    directory: Path
    losses: list[list[float]] = field(default_factory=list)  # [layer][step]
    seconds: float = 0.0


@dataclass(frozen=True)
class _Layer:
    """One layer's teacher tensors for one sequence: q ``[Hq, L, d]``, k/v ``[Hkv, L, d]``."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    evicted_at: torch.Tensor  # [Hkv, L]


def capture_layers(model: PreTrainedModel, ids: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Run ``ids`` ``[1, L]`` through the full model; return each layer's rotated (q, k, v)."""
    captured: dict[int, tuple[torch.Tensor, ...]] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = (query[0].detach(), key[0].detach(), value[0].detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("kvmerge_capture", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("kvmerge_capture")
    try:
        with torch.inference_mode():
            model(ids)
    finally:
        model.set_attn_implementation(previous)
    return [captured[i] for i in sorted(captured)]


def student_attention(kernels: LessKernels, layer: _Layer, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention outputs ``[Hq, L, d]`` of the compressed cache with LESS, and the rows ``[L]`` that
    had an eviction before them."""
    query, key, value = layer.query.float(), layer.key.float(), layer.value.float()
    group = query.shape[0] // key.shape[0]
    length = key.shape[1]
    steps = torch.arange(length)
    causal = steps.view(-1, 1) >= steps.view(1, -1)  # [i, j]
    kept = causal & (layer.evicted_at.unsqueeze(1) >= steps.view(1, -1, 1))  # [Hkv, i, j]
    absorbed = causal & ~kept
    key, value = key.repeat_interleave(group, 0), value.repeat_interleave(group, 0)
    kept, absorbed = kept.repeat_interleave(group, 0), absorbed.repeat_interleave(group, 0)
    exact = torch.matmul(query, key.transpose(-1, -2)) * scaling
    learned = pair_logits(kernels.log_phi(query), kernels.log_psi(key))
    logits = torch.where(kept, exact, torch.where(absorbed, learned, float("-inf")))
    return torch.matmul(logits.softmax(dim=-1), value), absorbed.any(dim=-1).any(dim=0)


def full_attention(layer: _Layer, scaling: float) -> torch.Tensor:
    """The teacher: causal attention ``[Hq, L, d]`` over every entry."""
    group = layer.query.shape[0] // layer.key.shape[0]
    key, value = layer.key.repeat_interleave(group, 0), layer.value.repeat_interleave(group, 0)
    return torch.nn.functional.scaled_dot_product_attention(
        layer.query.float(), key.float(), value.float(), is_causal=True, scale=scaling
    )


def train_less(
    model: PreTrainedModel,
    ids: torch.Tensor,
    method: str = "h2o",
    budget: int | float = 0.2,
    *,
    directory: Path,
    sequences: int = 8,
    tokens: int = 512,
    steps: int = 150,
    hidden: int = 32,
    rank: int = 8,
    learning_rate: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    **options,
) -> LessTraining:
    """Train LESS kernels for ``method`` (a selector) at ``budget`` on token ``ids`` ``[n]``; save them
    to ``directory``.

    ``ids`` are cut into ``sequences`` windows of ``tokens`` tokens; every layer trains for ``steps``
    Adam steps cycling over the windows. Returns the loss curves.
    """
    if "+" in method:
        raise ValueError(f"train-less takes a selector (h2o, streaming, ...), got {method!r}")
    kvmerge.make_method(method, budget, **options)  # validate before any compute
    if ids.numel() < sequences * tokens:
        raise ValueError(f"the training text has {ids.numel()} tokens, fewer than {sequences} x {tokens}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    windows = ids[: sequences * tokens].view(sequences, tokens)
    teacher, timelines = [], []
    for window in tqdm(windows, desc="capturing", disable=not progress):
        teacher.append(capture_layers(model, window.unsqueeze(0)))
        cache = kvmerge.make_cache(model, method, budget, chunk_size=1, record_evictions=True, **options)
        with torch.inference_mode():
            model(window.unsqueeze(0), **with_cache(model, cache))
        timelines.append([layer.evicted_at[0].clone() for layer in cache.layers])
    attention_modules = sorted(
        (m for m in model.modules() if hasattr(m, "o_proj") and hasattr(m, "layer_idx")), key=lambda m: m.layer_idx
    )
    if not attention_modules:
        raise ValueError(f"{type(model).__name__}: no attention module with an o_proj to train against")
    head_dim = teacher[0][0][1].shape[-1]
    scaling = 1 / math.sqrt(head_dim)
    kernels = nn.ModuleList(LessKernels(head_dim, hidden, rank) for _ in attention_modules)
    result = LessTraining(directory)
    bar = tqdm(total=len(kernels) * steps, desc="training LESS", disable=not progress)
    for layer_idx, (module, layer_kernels) in enumerate(zip(attention_modules, kernels, strict=True)):
        layers = [_layer(teacher[s][layer_idx], timelines[s][layer_idx], tokens) for s in range(sequences)]
        targets = [module.o_proj(_heads_last(full_attention(layer, scaling))).detach() for layer in layers]
        optimizer = torch.optim.Adam(layer_kernels.parameters(), lr=learning_rate)
        curve = []
        for step in range(steps):
            which = step % sequences
            out, rows = student_attention(layer_kernels, layers[which], scaling)
            loss = nn.functional.mse_loss(module.o_proj(_heads_last(out))[rows], targets[which][rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
            bar.update()
        result.losses.append(curve)
        bar.set_postfix(layer=layer_idx, loss=f"{curve[-1]:.3g}")
    bar.close()
    result.seconds = time.perf_counter() - started
    meta = {
        "model": str(getattr(model.config, "_name_or_path", type(model).__name__)),
        "method": method,
        "budget": budget,
        "options": options,
        "head_dim": head_dim,
        "hidden": hidden,
        "rank": rank,
        "sequences": sequences,
        "tokens": tokens,
        "steps": steps,
        "learning_rate": learning_rate,
        "seed": seed,
        "seconds": result.seconds,
        "loss_first": [curve[0] for curve in result.losses],
        "loss_last": [curve[-1] for curve in result.losses],
    }
    save_kernels(kernels, directory, meta)
    return result


def _layer(captured: tuple[torch.Tensor, ...], evicted_at: torch.Tensor, length: int) -> _Layer:
    query, key, value = captured
    timeline = torch.full((key.shape[0], length), 1 << 62, dtype=torch.long)
    timeline[:, : evicted_at.shape[-1]] = evicted_at
    return _Layer(query, key, value, timeline)


def _heads_last(out: torch.Tensor) -> torch.Tensor:
    """``[Hq, L, d]`` -> ``[L, Hq * d]``, the input of the output projection."""
    return out.transpose(0, 1).reshape(out.shape[1], -1)


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
    and the second half of Wikitext-2 test (perplexity, the demo and the needle test read leading slices)."""
    from kvmerge.eval.data import load_text

    essays, wiki = load_text("pg-essays"), load_text("wikitext2", data_dir)
    return essays[len(essays) // 5 :] + "\n\n" + wiki[len(wiki) // 2 :]


def merged_fraction(layers: list[tuple[torch.Tensor, ...]], similarity: float, recent: int) -> float:
    """Fraction of entries left after KVMerger's merging alone, over all layers and KV heads of one
    captured sequence (the last ``recent`` entries are never merged)."""
    from kvmerge.absorbers.kvmerger import merging_sets

    left, total = 0, 0
    for _, key, _ in layers:
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
    layers = capture_layers(model, ids)
    low, high, tried = -1.0, 1.0, {}
    for _ in range(rounds):
        middle = (low + high) / 2
        tried[middle] = merged_fraction(layers, middle, recent)
        low, high = (middle, high) if tried[middle] < target else (low, middle)
    best = min(tried, key=lambda t: abs(tried[t] - target))
    return best, tried
