"""CaM, Cache Merging (Zhang et al., ICML 2024): merge an evicted value into its kept neighbours.

For an evicted entry i and the next ``m`` kept entries after it (N):
``p = Ā_i / mean(Ā_N)``, ``M ~ Bernoulli(clamp(p, 0, 1))`` per sequence and KV head, and
``V_k += M * V_i / m`` for every k in N. Keys are never merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmerge.config import CompressionConfig
from kvmerge.method import Absorber, Eviction
from kvmerge.rng import head_keys, uniform_at
from kvmerge.stats import AccumulatedAttention, Statistic


def merge_probability(evicted_attention: torch.Tensor, neighbour_mean: torch.Tensor) -> torch.Tensor:
    """CaM's gate ``clamp(Ā_i / mean(Ā_N), 0, 1)``; 0/0 (no attention anywhere) and NaN give 0, x/0 gives 1."""
    p = evicted_attention / neighbour_mean
    return torch.nan_to_num(p, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


@dataclass(frozen=True)
class CaM(Absorber):
    name = "cam"
    description = "Cache Merging: merge each evicted value into its next m kept neighbours, Bernoulli-gated"

    def statistics(self, config: CompressionConfig) -> tuple[Statistic, ...]:
        return (AccumulatedAttention(config.gqa),)

    def absorb(self, eviction: Eviction, config: CompressionConfig) -> None:
        before, after, m = eviction.before, eviction.after, config.merge_window
        stat = AccumulatedAttention.name
        # Evicted slots per row in position order (padded with slots that were not evicted): [b, h, e].
        slots, is_evicted = eviction.evicted_slots, None
        if slots is None:
            count = int(eviction.evicted.sum(dim=-1).max())
            if count == 0:
                return
            n = eviction.evicted.shape[-1]
            earlier_first = torch.arange(n, 0, -1, device=eviction.evicted.device)  # larger for a lower slot
            slots = torch.topk(eviction.evicted * earlier_first, count, dim=-1).indices
            is_evicted = eviction.evicted.gather(-1, slots)
        # First kept entry after each evicted one; its m successors are the neighbours: [b, h, e, m].
        start = torch.searchsorted(eviction.kept_slots, slots.contiguous(), right=True)
        k = eviction.kept_slots.shape[-1]
        neighbours = start.unsqueeze(-1) + torch.arange(m, device=slots.device)
        has_neighbour = neighbours < k
        neighbours = neighbours.clamp(max=k - 1)
        kept_attention = after.stats[stat].unsqueeze(2).expand(*neighbours.shape[:3], k)
        neighbour_attention = kept_attention.gather(-1, neighbours) * has_neighbour
        neighbour_mean = neighbour_attention.sum(-1) / has_neighbour.sum(-1).clamp(min=1)
        p = merge_probability(before.stats[stat].gather(-1, slots), neighbour_mean)
        heads = head_keys(config.seed, before.layer_idx, slots.shape[1], slots.device)
        draw = uniform_at(heads, before.index.gather(-1, slots))
        gate = (draw < p) & has_neighbour.any(-1)  # [b, h, e]
        if is_evicted is not None:
            gate &= is_evicted
        d = before.values.shape[-1]
        evicted_values = before.values.gather(2, slots.unsqueeze(-1).expand(-1, -1, -1, d))
        contribution = torch.where(gate.unsqueeze(-1), evicted_values / m, 0.0)
        contribution = contribution.unsqueeze(3).expand(-1, -1, -1, m, -1) * has_neighbour.unsqueeze(-1)
        after.values.scatter_add_(
            2, neighbours.flatten(2, 3).unsqueeze(-1).expand(-1, -1, -1, d), contribution.flatten(2, 3)
        )
