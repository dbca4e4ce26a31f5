"""CaM, Cache Merging (Zhang et al., ICML 2024): merge an evicted value into its kept neighbours.

For an evicted entry i and the next ``m`` entries after it (N):
``p = Ā_i / mean(Ā_N)``, ``M ~ Bernoulli(clamp(p, 0, 1))`` per sequence and KV head, and
``V_k += M * V_i / m`` for every k in N. Keys are never merged.

CaM is defined one eviction per step. When one compression evicts several entries (a chunk, or
the prompt under the ``prefill`` schedule), they are merged as that many single evictions in
position order: N is the next ``m`` entries still present at i's turn (kept ones, and evicted ones
whose turn comes later), and an evicted entry passes on its value with what it received. So a
chunked or prefill compression merges like token-by-token streaming instead of piling every
evicted value onto the same ``m`` kept entries (which blows values up when more than ``m`` go).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmerge.config import CompressionConfig
from kvmerge.method import Absorber, Eviction
from kvmerge.rng import head_keys, uniform_at
from kvmerge.slots import add_to_slots, read_slots
from kvmerge.stats import AccumulatedAttention, Statistic


def merge_gate(
    draw: torch.Tensor, evicted_attention: torch.Tensor, neighbour_sum: torch.Tensor, neighbour_count: torch.Tensor
) -> torch.Tensor:
    """CaM's gate ``M = [u < clamp(Ā_i / mean(Ā_N), 0, 1)]`` for a uniform ``draw`` u in [0, 1), as
    ``u * sum(Ā_N) < Ā_i * |N|``: the same decision for attention >= 0, without a division. No
    neighbours, 0/0 and NaN never merge; x/0 (x > 0) always does."""
    return draw * neighbour_sum < evicted_attention * neighbour_count


@dataclass(frozen=True)
class CaM(Absorber):
    name = "cam"
    description = "Cache Merging: merge each evicted value into its next m kept neighbours, Bernoulli-gated"

    def statistics(self, config: CompressionConfig) -> tuple[Statistic, ...]:
        return (AccumulatedAttention(config.gqa),)

    def absorb(self, eviction: Eviction, config: CompressionConfig) -> None:
        slots = eviction.evicted_slots
        if slots is not None and slots.shape[-1] == 1:
            self._absorb_one(eviction, config)
        else:
            self._absorb_several(eviction, config)

    def _absorb_one(self, eviction: Eviction, config: CompressionConfig) -> None:
        """One eviction per row (decoding), in any slot order: N is the ``m`` kept entries with the
        next positions, found in ``after`` by position."""
        before, after, m = eviction.before, eviction.after, config.merge_window
        slot = eviction.evicted_slots  # [b, h, 1]
        position = before.index.gather(-1, slot)
        gap = after.index - position  # [b, h, k]: > 0 for the later entries
        nearest = gap.masked_fill_(gap <= 0, _FAR).topk(min(m, gap.shape[-1]), dim=-1, largest=False)
        neighbours, present = nearest.indices, nearest.values < _FAR  # [b, h, m]
        attention = after.stats[AccumulatedAttention.name].gather(-1, neighbours)
        gate = _gate(
            before.stats[AccumulatedAttention.name].gather(-1, slot),
            (attention * present).sum(-1, keepdim=True),
            present.sum(-1, keepdim=True),
            position,
            before.layer_idx,
            config.seed,
        )
        merged = read_slots(before.values, slot)  # [b, h, 1, d]
        weight = (gate & present).to(merged.dtype).div_(m).unsqueeze(-1)  # [b, h, m, 1]
        add_to_slots(after.values, neighbours, merged * weight)

    def _absorb_several(self, eviction: Eviction, config: CompressionConfig) -> None:
        """Any evictions, ``before`` in position order: each merges in position order (see the module)."""
        before, after, m = eviction.before, eviction.after, config.merge_window
        attention = before.stats[AccumulatedAttention.name]
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
        # Present entries by rank (empty slots skipped); the m after each evicted one: [b, h, e, m].
        valid = before.index >= 0
        rank = valid.long().cumsum(-1) - 1  # [b, h, n]
        slot_of_rank = torch.zeros_like(rank).scatter_(-1, torch.where(valid, rank, rank.shape[-1] - 1), _slots(rank))
        evicted_rank = rank.gather(-1, slots)
        neighbour_rank = evicted_rank.unsqueeze(-1) + torch.arange(1, m + 1, device=slots.device)
        has_neighbour = neighbour_rank < valid.sum(-1, keepdim=True).unsqueeze(-1)
        neighbours = slot_of_rank.gather(-1, neighbour_rank.clamp(max=rank.shape[-1] - 1).flatten(2)).view_as(
            neighbour_rank
        )
        neighbour_attention = attention.gather(-1, neighbours.flatten(2)).view_as(neighbours)
        gate = _gate(
            attention.gather(-1, slots),
            (neighbour_attention * has_neighbour).sum(-1),
            has_neighbour.sum(-1),
            before.index.gather(-1, slots),
            before.layer_idx,
            config.seed,
        )
        if is_evicted is not None:
            gate &= is_evicted
        d = before.values.shape[-1]
        merged = before.values.gather(2, slots.unsqueeze(-1).expand(-1, -1, -1, d)).float()  # [b, h, e, d]
        if slots.shape[-1] > 1:
            merged = _cascade(merged, gate.float() / m, evicted_rank, m)
        # Each gated value / m into its kept neighbours (the evicted ones took theirs in the cascade).
        kept_slots = eviction.kept_slots  # [b, h, k], -1 for an empty slot of after
        n = rank.shape[-1]
        after_slot = torch.full((*kept_slots.shape[:2], n + 1), -1, dtype=torch.long, device=kept_slots.device)
        after_slot = after_slot.scatter_(-1, torch.where(kept_slots >= 0, kept_slots, n), _slots(kept_slots))[..., :n]
        targets = after_slot.gather(-1, neighbours.flatten(2)).view_as(neighbours)  # -1: not kept
        _scatter(after.values, merged, gate, targets.clamp(min=0), has_neighbour & (targets >= 0), m)


_FAR = torch.iinfo(torch.long).max


def _gate(
    evicted_attention: torch.Tensor,
    neighbour_sum: torch.Tensor,
    neighbour_count: torch.Tensor,
    positions: torch.Tensor,
    layer_idx: int | torch.Tensor,
    seed: int,
) -> torch.Tensor:
    """CaM's Bernoulli merge decision ``[b, h, e]`` for evicted entries with attention ``Ā_i``, their
    neighbours' summed ``Ā`` and count, and ``positions`` (each ``[b, h, e]``); the draw is the
    counter-based hash of (seed, layer, KV head, position)."""
    heads = head_keys(seed, layer_idx, positions.shape[1], positions.device)
    return merge_gate(uniform_at(heads, positions), evicted_attention, neighbour_sum, neighbour_count)


def _scatter(
    values: torch.Tensor,
    merged: torch.Tensor,
    gate: torch.Tensor,
    targets: torch.Tensor,
    hit: torch.Tensor,
    m: int,
) -> None:
    """``values[k] += gate * merged / m`` in place for every target slot ``k`` of ``values``
    ``[b, h, k, d]``: ``merged`` ``[b, h, e, d]``, ``gate`` ``[b, h, e]``, ``targets`` and ``hit``
    (whether the target counts) ``[b, h, e, m]``."""
    weight = (gate.unsqueeze(-1) & hit).to(merged.dtype) / m  # [b, h, e, m]
    contribution = (merged.unsqueeze(3) * weight.unsqueeze(-1)).to(values.dtype)  # [b, h, e, m, d]
    d = values.shape[-1]
    values.scatter_add_(2, targets.flatten(2, 3).unsqueeze(-1).expand(-1, -1, -1, d), contribution.flatten(2, 3))


def _slots(like: torch.Tensor) -> torch.Tensor:
    """``0 .. n-1`` along the last dimension of ``like`` ``[b, h, n]``, expanded to its shape."""
    return torch.arange(like.shape[-1], device=like.device).expand_as(like)


def _cascade(values: torch.Tensor, weight: torch.Tensor, rank: torch.Tensor, m: int) -> torch.Tensor:
    """Evicted values ``[b, h, e, d]`` (position order, present ranks ``rank`` ``[b, h, e]``) with what
    earlier evictions of the same compression merged into them: ``x_l = v_l + sum_k weight_k x_k`` over
    the earlier ``k`` whose rank is at most ``m`` below ``l``'s. Ranks strictly increase, so such a ``k``
    is among the ``m`` evictions before ``l``: the system is solved ``m`` rows at a time, each block one
    small triangular solve fed by the block before it."""
    e = values.shape[2]
    solved: list[torch.Tensor] = []
    for start in range(0, e, m):
        stop, low = min(start + m, e), max(start - m, 0)
        # coupling[l, k] = weight_k when k feeds l, for rows l of the block and columns k in [low, stop)
        gap = rank[..., start:stop].unsqueeze(-1) - rank[..., low:stop].unsqueeze(-2)  # [b, h, r, c]
        coupling = ((gap >= 1) & (gap <= m)) * weight[..., low:stop].unsqueeze(-2)
        rhs = values[..., start:stop, :]
        if start:
            rhs = rhs + coupling[..., : start - low] @ solved[-1]
        eye = torch.eye(stop - start, device=values.device)
        solved.append(torch.linalg.solve_triangular(eye - coupling[..., start - low :], rhs, upper=False))
    return torch.cat(solved, dim=2)
