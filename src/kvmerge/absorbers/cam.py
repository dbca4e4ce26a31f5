"""CaM, Cache Merging (Zhang et al., ICML 2024): merge an evicted value into its kept neighbours.

The paper's rule: for an evicted entry i and the next ``m`` entries after it (N), ``M ~ Bernoulli(
clamp(p, 0, 1))`` per sequence and KV head, and ``V_k += M * V_i / m`` for every k in N. Keys are
never merged. Each part is an option (METHODS.md; the study behind the defaults is in
docs/BENCHMARKS.md):

- ``normalizer``: ``"max"`` (default), ``p = Ā_i / max(Ā over the kept entries)``, the official code
  behind the paper's zero-shot tables (``max_over="windows"``: over the sinks and the recent window
  only, as that code does); ``"mean"``, ``p = Ā_i / mean(Ā_N)``, Eq. 14 as printed (kvpress's
  ``CAMPress``).
- ``gate``: ``"expected"`` (default) merges ``p * V_i / m`` every time, the Bernoulli merge's
  expectation without its variance (no seed needed); ``"bernoulli"`` draws M, as the paper does.
- ``centered`` (default on) merges ``V_i - Ō`` instead of ``V_i``, where ``Ō = sum_j Ā_j V_j / sum_j Ā_j``
  over the cache before the eviction (the mean past attention output). After an eviction the
  softmax renormalises, so the output moves by ``A_i / (1 - A_i) * (O - V_i)``: putting back ``A_i V_i``
  leaves ``A_i / (1 - A_i) * O``, a drift along the mean output that piles up in long-lived targets;
  putting back ``A_i (V_i - Ō)`` leaves about nothing when ``O`` is near ``Ō``.
- ``targets``: ``"window"`` (default): of the next m entries, only those in the protected recent window
  receive (the official code merges into the local window; a selector without one, TOVA, then
  merges nothing); ``"next"``: all of them, as Eq. 14 reads.
- ``per_step``: the gate compares Ā per query since each entry arrived, ``Ā_j / (seen - position_j)``.

The paper's rule is :data:`PAPER_RULE`: ``normalizer="mean", gate="bernoulli", centered=False, targets="next"``.

CaM is defined one eviction per step. When one compression evicts several entries (a chunk, or
the prompt under the ``prefill`` schedule), they are merged as that many single evictions in
position order: N is the next ``m`` entries still present at i's turn (kept ones, and evicted ones
whose turn comes later), and an evicted entry passes on its value with what it received. So a
chunked or prefill compression merges like token-by-token streaming instead of piling every
evicted value onto the same ``m`` kept entries (which blows values up when more than ``m`` go).
The max normaliser and ``Ō`` are those of the compression (not recomputed between its evictions).
"""

from __future__ import annotations

from collections import defaultdict
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import torch

from kvmerge.config import CompressionConfig
from kvmerge.method import Absorber, Entries, Eviction
from kvmerge.rng import head_keys, uniform_at
from kvmerge.slots import add_to_slots, read_slots
from kvmerge.stats import AccumulatedAttention, Statistic


class MergeLog:
    """Counts CaM's merges per layer while active, for diagnostics (``kvmerge eval perturbation``)::

        with MergeLog() as log:
            model(ids, **kvmerge.with_cache(model, kvmerge.make_cache(model, "h2o+cam", budget=64)))
        log.summary()  # {layer: {"evictions", "merges", "compressions", "pass_rate", "merges_per_step"}}

    ``evictions`` counts evicted entries that had a target (per sequence and KV head), ``merges`` the
    gate's passes among them (with ``gate="expected"``, the sum of the merge probabilities) and
    ``compressions`` the compressions that evicted (per sequence and KV head: steps x rows).
    """

    def __init__(self) -> None:
        self.counts: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._token = None

    def __enter__(self) -> MergeLog:
        self._token = _ACTIVE_LOG.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE_LOG.reset(self._token)

    def add(self, layer_idx: int | torch.Tensor, weight: torch.Tensor, eligible: torch.Tensor) -> None:
        """Fold one compression's merge weights ``[b, h, e]`` of its ``eligible`` evictions (bool, same
        shape) into the counts; ``layer_idx`` an int or ``[b, 1, 1]`` per row."""
        layers = layer_idx.view(-1).tolist() if isinstance(layer_idx, torch.Tensor) else [layer_idx] * weight.shape[0]
        heads = weight.shape[1]
        weight, eligible = (weight.float() * eligible).sum(-1), eligible.sum(-1)  # [b, h]
        for row, layer in enumerate(layers):
            counts = self.counts[int(layer)]
            counts["evictions"] += float(eligible[row].sum())
            counts["merges"] += float(weight[row].sum())
            counts["compressions"] += heads

    def summary(self) -> dict[int, dict[str, float]]:
        """Per layer: the counts, the gate's ``pass_rate`` (merges / evictions) and ``merges_per_step``
        (merges per compression, per sequence and KV head)."""
        out = {}
        for layer, c in sorted(self.counts.items()):
            rate = c["merges"] / c["evictions"] if c["evictions"] else 0.0
            out[layer] = {**c, "pass_rate": rate, "merges_per_step": c["merges"] / max(c["compressions"], 1)}
        return out


_ACTIVE_LOG: ContextVar[MergeLog | None] = ContextVar("kvmerge_cam_merge_log", default=None)
NORMALIZERS = ("max", "mean")
MAX_OVER = ("kept", "windows")
GATES = ("bernoulli", "expected")
TARGETS = ("next", "window")
PAPER_RULE = {"normalizer": "mean", "gate": "bernoulli", "centered": False, "targets": "next"}  # Eq. 14 as printed


def merge_gate(
    draw: torch.Tensor, evicted_attention: torch.Tensor, normalizer: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """CaM's gate ``M = [u < clamp(Ā_i * count / normalizer, 0, 1)]`` for a uniform ``draw`` u in [0, 1),
    as ``u * normalizer < Ā_i * count``: the same decision for attention >= 0, without a division. With
    the mean normaliser ``normalizer = sum(Ā_N)`` and ``count = |N|``; with the max, the max and 1. A
    zero count, 0/0 and NaN never merge; x/0 (x > 0) always does."""
    return draw * normalizer < evicted_attention * count


def merge_probability(evicted_attention: torch.Tensor, normalizer: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``clamp(Ā_i * count / normalizer, 0, 1)``, the probability :func:`merge_gate` passes with (same
    conventions: 0/0 and NaN give 0, x/0 with x > 0 gives 1)."""
    numerator = evicted_attention * count
    ratio = (numerator / normalizer).nan_to_num_(nan=0.0, posinf=1.0)
    return ratio.clamp_(0.0, 1.0).masked_fill_(numerator.isnan(), 0.0)


@dataclass(frozen=True)
class CaM(Absorber):
    """Options ``normalizer``, ``max_over``, ``gate``, ``centered``, ``targets`` and ``per_step``: see the
    module. ``m`` and the seed are the shared ``merge_window`` and ``seed``."""

    normalizer: Literal["max", "mean"] = "max"
    max_over: Literal["kept", "windows"] = "kept"
    gate: Literal["bernoulli", "expected"] = "expected"
    centered: bool = True
    per_step: bool = False
    targets: Literal["next", "window"] = "window"

    name = "cam"
    description = "Cache Merging: merge each evicted value into its next m neighbours in the local window, gated"

    def __post_init__(self) -> None:
        for option, value, valid in (
            ("normalizer", self.normalizer, NORMALIZERS),
            ("max_over", self.max_over, MAX_OVER),
            ("gate", self.gate, GATES),
            ("targets", self.targets, TARGETS),
        ):
            if value not in valid:
                raise ValueError(f"cam's {option} must be one of {', '.join(map(repr, valid))}, got {value!r}")
        for option in ("centered", "per_step"):
            if not isinstance(getattr(self, option), bool):
                raise TypeError(f"cam's {option} must be a bool, got {type(getattr(self, option)).__name__}")
        if self.max_over != "kept" and self.normalizer != "max":
            raise ValueError("cam's max_over applies to normalizer='max' only")

    def statistics(self, config: CompressionConfig) -> tuple[Statistic, ...]:
        return (AccumulatedAttention(config.gqa),)

    def draws_random(self) -> bool:
        return self.gate == "bernoulli"

    def value_sums(self) -> tuple[str, ...]:
        return (AccumulatedAttention.name,) if self.centered else ()  # Ō's numerator, with the attention

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
        if eviction.evicting is not None:  # rows that gave up an empty slot merge nothing
            present = present & eviction.evicting
        if self.targets == "window":
            present = present & _in_window(after.index.gather(-1, neighbours), eviction.windows)
        if self.normalizer == "mean":
            attention = self._attention(after).gather(-1, neighbours)
            normalizer, count = (attention * present).sum(-1, keepdim=True), present.sum(-1, keepdim=True)
        else:
            normalizer, count = self._max(after, eviction.windows)
        weight = self._weight(
            self._attention(before).gather(-1, slot), normalizer, count, position, before.layer_idx, config
        )
        if (log := _ACTIVE_LOG.get()) is not None:
            log.add(before.layer_idx, weight, present.any(-1, keepdim=True))
        merged = read_slots(before.values, slot)  # [b, h, 1, d]
        if self.centered:
            merged = merged - _mean_output(before)
        weight = (weight & present if weight.dtype == torch.bool else weight * present).to(merged.dtype)
        add_to_slots(after.values, neighbours, merged * weight.div_(m).unsqueeze(-1))

    def _absorb_several(self, eviction: Eviction, config: CompressionConfig) -> None:
        """Any evictions, ``before`` in position order: each merges in position order (see the module)."""
        before, after, m = eviction.before, eviction.after, config.merge_window
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
        if bool(valid.all()):  # no empty slot: ranks are slots
            rank = slot_of_rank = _slots(before.index)
        else:
            rank = valid.long().cumsum(-1) - 1  # [b, h, n]
            slot_of_rank = torch.zeros_like(rank).scatter_(
                -1, torch.where(valid, rank, rank.shape[-1] - 1), _slots(rank)
            )
        evicted_rank = rank.gather(-1, slots)
        neighbour_rank = evicted_rank.unsqueeze(-1) + torch.arange(1, m + 1, device=slots.device)
        has_neighbour = neighbour_rank < valid.sum(-1, keepdim=True).unsqueeze(-1)
        neighbours = slot_of_rank.gather(-1, neighbour_rank.clamp(max=rank.shape[-1] - 1).flatten(2)).view_as(
            neighbour_rank
        )
        # The kept neighbours: their slots in after, -1 where not kept.
        kept_slots = eviction.kept_slots  # [b, h, k], -1 for an empty slot of after
        n = rank.shape[-1]
        after_slot = torch.full((*kept_slots.shape[:2], n + 1), -1, dtype=torch.long, device=kept_slots.device)
        after_slot = after_slot.scatter_(-1, torch.where(kept_slots >= 0, kept_slots, n), _slots(kept_slots))[..., :n]
        targets = after_slot.gather(-1, neighbours.flatten(2)).view_as(neighbours)  # -1: not kept
        if self.targets == "window":  # kept neighbours count only inside the window; evicted ones pass on
            positions = before.index.gather(-1, neighbours.flatten(2)).view_as(neighbours)
            has_neighbour = has_neighbour & ((targets < 0) | _in_window(positions, eviction.windows))
        hit = has_neighbour & (targets >= 0)
        attention = self._attention(before)
        if self.normalizer == "mean":
            neighbour_attention = attention.gather(-1, neighbours.flatten(2)).view_as(neighbours)
            normalizer, count = (neighbour_attention * has_neighbour).sum(-1), has_neighbour.sum(-1)
        else:
            normalizer, count = self._max(after, eviction.windows)
            count = count & has_neighbour.any(-1)
        weight = self._weight(
            attention.gather(-1, slots), normalizer, count, before.index.gather(-1, slots), before.layer_idx, config
        )
        if is_evicted is not None:
            weight = weight & is_evicted if weight.dtype == torch.bool else weight * is_evicted
        if (log := _ACTIVE_LOG.get()) is not None:
            log.add(before.layer_idx, weight, has_neighbour.any(-1) & (True if is_evicted is None else is_evicted))
        weight = weight.float()
        merged = read_slots(before.values, slots).float()  # [b, h, e, d]
        if self.centered:
            merged = merged - _mean_output(before).float()
        if slots.shape[-1] > 1:
            merged = _cascade(merged, weight / m, evicted_rank, m)
        # Each weighted value / m into its kept neighbours (the evicted ones took theirs in the cascade).
        _scatter(after.values, merged, weight, targets.clamp(min=0), hit, m)

    def _max(self, after: Entries, windows: tuple[int, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The max normaliser ``[b, h, 1]`` over the kept entries (or their protected windows) and the
        count it stands for: 1, or 0 where that set is empty (nothing to normalise by: no merge)."""
        attention, index = self._attention(after), after.index
        members = index >= 0
        if self.max_over == "windows":
            if windows is None:
                raise ValueError("cam's max_over='windows' needs the compression's protected windows")
            sink, recent_start = windows
            members = members & ((index < sink) | (index >= recent_start))
        normalizer = attention.masked_fill(~members, 0.0).amax(-1, keepdim=True)
        return normalizer, members.any(-1, keepdim=True)

    def _attention(self, entries: Entries) -> torch.Tensor:
        """The gate's attention statistic ``[b, h, n]``: Ā, or Ā per step since arrival (``per_step``)."""
        return _rate(entries) if self.per_step else entries.stats[AccumulatedAttention.name]

    def _weight(
        self,
        evicted_attention: torch.Tensor,
        normalizer: torch.Tensor,
        count: torch.Tensor,
        positions: torch.Tensor,
        layer_idx: int | torch.Tensor,
        config: CompressionConfig,
    ) -> torch.Tensor:
        """The merge weight (before ``1 / m``) of each evicted entry ``[b, h, e]``: the Bernoulli gate (bool),
        whose draw is the counter-based hash of (seed, layer, KV head, position), or its probability."""
        if self.gate == "expected":
            return merge_probability(evicted_attention, normalizer, count)
        heads = head_keys(config.seed, layer_idx, positions.shape[1], positions.device)
        return merge_gate(uniform_at(heads, positions), evicted_attention, normalizer, count)


def _in_window(positions: torch.Tensor, windows: tuple[int, torch.Tensor] | None) -> torch.Tensor:
    """Whether entries at ``positions`` ``[b, h, ...]`` lie in the protected recent window."""
    if windows is None:
        raise ValueError("cam's targets='window' needs the compression's protected windows")
    recent_start = windows[1]
    return positions >= recent_start.view(-1, 1, *(1,) * (positions.dim() - 2))


def _rate(entries: Entries) -> torch.Tensor:
    """Each entry's attention rate ``[b, h, n]``: Ā per query since it arrived, ``Ā_j / (seen - position_j)``."""
    age = (entries.seen.view(-1, 1, 1) - entries.index).clamp(min=1)
    return entries.stats[AccumulatedAttention.name] / age


def _mean_output(entries: Entries) -> torch.Tensor:
    """``Ō = sum_j Ā_j V_j / sum_j Ā_j`` over the valid entries ``[b, h, n]`` -> ``[b, h, 1, d]`` (zero
    without attention). The numerator comes with the step's attention when the cache computed it
    (:attr:`~kvmerge.method.Entries.value_sums`), else from one pass over the values here."""
    attention = entries.stats[AccumulatedAttention.name].masked_fill(entries.index < 0, 0.0)
    total = attention.sum(-1, keepdim=True).clamp_(min=torch.finfo(attention.dtype).tiny).unsqueeze(-1)
    weighted = entries.value_sums.get(AccumulatedAttention.name)
    if weighted is None:
        weighted = attention.unsqueeze(-2).to(entries.values.dtype) @ entries.values  # [b, h, 1, d]
    return (weighted / total.to(weighted.dtype)).to(entries.values.dtype)


_FAR = torch.iinfo(torch.long).max
_CASCADE_BLOCK = 64  # rows per triangular solve of a bulk merge (a decoding chunk's evictions in one)


def _scatter(
    values: torch.Tensor,
    merged: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    hit: torch.Tensor,
    m: int,
) -> None:
    """``values[k] += weight * merged / m`` in place for every target slot ``k`` of ``values``
    ``[b, h, k, d]``: ``merged`` ``[b, h, e, d]``, ``weight`` ``[b, h, e]`` float, ``targets`` and ``hit``
    (whether the target counts) ``[b, h, e, m]``."""
    weight = (weight.unsqueeze(-1) * hit).to(merged.dtype) / m  # [b, h, e, m]
    contribution = (merged.unsqueeze(3) * weight.unsqueeze(-1)).to(values.dtype)  # [b, h, e, m, d]
    add_to_slots(values, targets.flatten(2, 3), contribution.flatten(2, 3))


def _slots(like: torch.Tensor) -> torch.Tensor:
    """``0 .. n-1`` along the last dimension of ``like`` ``[b, h, n]``, expanded to its shape."""
    return torch.arange(like.shape[-1], device=like.device).expand_as(like)


def _cascade(values: torch.Tensor, weight: torch.Tensor, rank: torch.Tensor, m: int) -> torch.Tensor:
    """Evicted values ``[b, h, e, d]`` (position order, present ranks ``rank`` ``[b, h, e]``) with what
    earlier evictions of the same compression merged into them: ``x_l = v_l + sum_k weight_k x_k`` over
    the earlier ``k`` whose rank is at most ``m`` below ``l``'s. Ranks strictly increase, so such a ``k``
    is among the ``m`` evictions before ``l``: the system is solved in blocks of ``_CASCADE_BLOCK`` (at
    least ``m``) rows, each one small triangular solve fed by the last ``m`` rows of the block before it."""
    e = values.shape[2]
    block = max(m, _CASCADE_BLOCK)
    solved: list[torch.Tensor] = []
    for start in range(0, e, block):
        stop, low = min(start + block, e), max(start - m, 0)
        # coupling[l, k] = weight_k when k feeds l, for rows l of the block and columns k in [low, stop)
        gap = rank[..., start:stop].unsqueeze(-1) - rank[..., low:stop].unsqueeze(-2)  # [b, h, r, c]
        coupling = ((gap >= 1) & (gap <= m)) * weight[..., low:stop].unsqueeze(-2)
        rhs = values[..., start:stop, :]
        if start:
            rhs = rhs + coupling[..., : start - low] @ solved[-1][..., low - start :, :]
        eye = torch.eye(stop - start, device=values.device)
        solved.append(torch.linalg.solve_triangular(eye - coupling[..., start - low :], rhs, upper=False))
    return solved[0] if len(solved) == 1 else torch.cat(solved, dim=2)
