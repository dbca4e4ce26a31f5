"""KVMerger (Wang et al. 2024): merge runs of similar consecutive keys at prefill.

Per layer and KV head, consecutive candidate keys whose cosine similarity with their
neighbour is >= ``similarity`` form disjoint contiguous sets. Each set collapses into one entry
at its pivot p (the member with the largest accumulated attention) with Gaussian-kernel
weights ``g_i = exp(-||k_p - k_i||^2 / (2 sigma^2))``, ``w = g / sum(g)``:
``k' = sum w_i k_i`` and ``v' = sum w_i v_i``. The selector then evicts whatever still exceeds
the budget. ``sigma=None`` sets ``sigma^2`` per set to the mean squared distance to the pivot,
which makes the weights independent of the keys' scale.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.nn.functional import cosine_similarity

from kvmerge.config import CompressionConfig
from kvmerge.method import Absorber, Entries
from kvmerge.stats import AccumulatedAttention, Statistic


@dataclass(frozen=True)
class KVMerger(Absorber):
    similarity: float = 0.9
    sigma: float | None = None

    name = "kvmerger"
    description = "KVMerger: at prefill, merge runs of similar consecutive keys into their pivot (Gaussian weights)"
    schedule = "prefill"

    def __post_init__(self) -> None:
        if not isinstance(self.similarity, (int, float)) or not -1.0 <= self.similarity <= 1.0:
            raise ValueError(f"kvmerger similarity is a cosine threshold in [-1, 1], got {self.similarity!r}")
        if self.sigma is not None and (not isinstance(self.sigma, (int, float)) or self.sigma <= 0):
            raise ValueError(f"kvmerger sigma must be > 0 or None, got {self.sigma!r}")

    def statistics(self, config: CompressionConfig) -> tuple[Statistic, ...]:
        return (AccumulatedAttention(config.gqa),)

    def merge(self, entries: Entries, candidates: torch.Tensor, config: CompressionConfig) -> Entries:
        sets = merging_sets(entries.keys, candidates, self.similarity)  # [b, h, n], -1 outside sets
        return merge_sets(entries, sets, self.sigma)


def merging_sets(keys: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """Label runs of consecutive ``candidates`` whose neighbouring ``keys`` ``[b, h, n, d]`` have cosine
    similarity >= ``threshold``: ``[b, h, n]`` set ids unique per row, ``-1`` for entries in no run."""
    similar = cosine_similarity(keys[:, :, :-1].float(), keys[:, :, 1:].float(), dim=-1) >= threshold
    link = similar & candidates[:, :, :-1] & candidates[:, :, 1:]  # entry j joins entry j + 1
    joined_left = torch.nn.functional.pad(link, (1, 0))
    joined_right = torch.nn.functional.pad(link, (0, 1))
    ids = (~joined_left).long().cumsum(-1)
    return torch.where(joined_left | joined_right, ids, -1)


def merge_sets(entries: Entries, sets: torch.Tensor, sigma: float | None) -> Entries:
    """Collapse every set of ``sets`` ``[b, h, n]`` into its pivot (largest accumulated attention)."""
    keys, values, attention = entries.keys.float(), entries.values.float(), entries.stats[AccumulatedAttention.name]
    batch, heads, n, dim = keys.shape
    member = sets >= 0
    slot = torch.arange(n, device=keys.device).expand(batch, heads, n)
    group = torch.where(member, sets, 0)
    # pivot: the first member with the set's largest attention
    best = torch.full((batch, heads, n + 1), float("-inf"), device=keys.device)
    best = best.scatter_reduce(-1, group, attention.masked_fill(~member, float("-inf")), "amax")
    is_best = member & (attention >= best.gather(-1, group))
    first = torch.full((batch, heads, n + 1), n, device=keys.device)
    pivot_slot = first.scatter_reduce(-1, group, torch.where(is_best, slot, n), "amin").gather(-1, group)
    pivot = member & (slot == pivot_slot)
    pivot_keys = keys.gather(2, pivot_slot.clamp(max=n - 1).unsqueeze(-1).expand(-1, -1, -1, dim))
    distance = (keys - pivot_keys).pow(2).sum(-1)  # [b, h, n]
    if sigma is None:
        spread = torch.zeros(batch, heads, n + 1, device=keys.device).scatter_add(-1, group, distance * member)
        size = torch.zeros(batch, heads, n + 1, device=keys.device).scatter_add(-1, group, member.float())
        variance = (spread / (size - 1).clamp(min=1)).gather(-1, group).clamp(min=1e-12)
    else:
        variance = torch.full_like(distance, sigma**2)
    kernel = torch.exp(-distance / (2 * variance)) * member
    total = torch.zeros(batch, heads, n + 1, device=keys.device).scatter_add(-1, group, kernel).gather(-1, group)
    weight = torch.where(member, kernel / total.clamp(min=1.0), 0.0).unsqueeze(-1)  # a set's total is >= 1 (pivot)
    target = pivot_slot.clamp(max=n - 1).unsqueeze(-1).expand(-1, -1, -1, dim)
    outside = ~member.unsqueeze(-1)
    merged_keys = torch.where(outside, keys, 0.0).scatter_add(2, target, weight * keys)
    merged_values = torch.where(outside, values, 0.0).scatter_add(2, target, weight * values)
    return replace(
        entries,
        keys=merged_keys.to(entries.keys.dtype),
        values=merged_values.to(entries.values.dtype),
        index=torch.where(member & ~pivot, -1, entries.index),
    )
