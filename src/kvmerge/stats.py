"""Per-entry statistics that selectors and absorbers read, updated from attention probabilities.

A statistic is a tensor ``[batch, kv_heads, entries]`` that lives beside the keys and values:
the cache appends zeros for new entries and gathers it when it evicts, so a method never
handles bookkeeping. Two methods asking for the same statistic (same ``name``) share it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Observation:
    """The attention of a block of query rows over the current entries.

    Attributes
    ----------
    probs:
        ``[batch, kv_heads, group, rows, entries]`` softmax probabilities per query head
        (query head ``h`` belongs to KV head ``h // group``); zero where not visible.
    visible:
        ``[batch, 1, rows, entries]`` bool, which entries each row attended (padding rows see none).
    query_index:
        ``[batch, rows]`` position of each row's query in its sequence (``-1`` for padding).
    seen:
        ``[batch]`` tokens each sequence has seen, this step included.
    """

    probs: torch.Tensor
    visible: torch.Tensor
    query_index: torch.Tensor
    seen: torch.Tensor


def aggregate_group(probs: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce ``[batch, kv_heads, group, rows, n]`` over the group of query heads -> ``[batch, kv_heads, rows, n]``."""
    if how == "mean":
        return probs.mean(dim=2)
    if how == "max":
        return probs.amax(dim=2)
    return probs.sum(dim=2)


class Statistic(ABC):
    """One named per-entry statistic."""

    name: str
    dtype: torch.dtype = torch.float32

    @abstractmethod
    def update(self, value: torch.Tensor, seen: Observation) -> torch.Tensor:
        """Fold one block of attention rows into ``value`` ``[batch, kv_heads, n]`` and return it: the
        cache owns ``value``, so it is updated in place where possible (it may be a view of a buffer).

        ``n`` may be fewer than the layer holds: the block's rows see only the first ``n`` entries (the
        entries after them are the step's own later tokens, not yet seen by any query)."""

    def query_rows(self) -> int | None:
        """How many of a step's newest query rows this statistic reads (``None``: every row). The cache
        computes attention probabilities for those rows only and attends the others with SDPA."""
        return None


@dataclass(frozen=True)
class AccumulatedAttention(Statistic):
    """H2O's Ā: the attention each entry received, summed over every query since it entered."""

    gqa: str = "mean"
    name: str = "accumulated_attention"

    def update(self, value: torch.Tensor, seen: Observation) -> torch.Tensor:
        return value.add_(aggregate_group(seen.probs, self.gqa).sum(dim=2))


@dataclass(frozen=True)
class AttentionHistory(Statistic):
    """A ``window``-bit history per entry, kept as an int64 bit field: bit ``i`` is set when the
    query ``i`` steps ago gave the entry less than (``below``; Scissorhands) or at least (CORM)
    ``threshold`` times the uniform share, 1 / entries that query saw. Unseen entries never set a bit.
    """

    window: int = 16
    below: bool = True
    threshold: float = 1.0
    gqa: str = "mean"
    dtype: torch.dtype = torch.int64

    @property
    def name(self) -> str:
        return "low_attention_history" if self.below else "important_history"

    def update(self, value: torch.Tensor, seen: Observation) -> torch.Tensor:
        probs = aggregate_group(seen.probs, self.gqa)  # [b, h, r, n]
        rows = min(probs.shape[2], self.window)
        probs, visible = probs[:, :, -rows:], seen.visible[:, :, -rows:]
        share = self.threshold / visible.sum(dim=-1, keepdim=True).clamp(min=1)  # [b, 1, r, 1]
        hit = visible & ((probs < share) if self.below else (probs >= share))
        shifts = torch.arange(rows - 1, -1, -1, device=value.device).view(1, 1, rows, 1)
        bits = (hit.long() << shifts).sum(dim=2)
        return value.bitwise_left_shift_(rows).bitwise_or_(bits).bitwise_and_((1 << self.window) - 1)

    def query_rows(self) -> int:
        return self.window  # older rows' bits are shifted out of the window

    @staticmethod
    def count(value: torch.Tensor, window: int) -> torch.Tensor:
        """Number of set bits of ``value`` ``[...]`` -> ``[...]`` int64."""
        bits = torch.arange(window, device=value.device)
        return ((value.unsqueeze(-1) >> bits) & 1).sum(dim=-1)


@dataclass(frozen=True)
class CurrentAttention(Statistic):
    """TOVA's statistic: the newest query's attention, averaged over all query heads of the layer."""

    name: str = "current_attention"

    def update(self, value: torch.Tensor, seen: Observation) -> torch.Tensor:
        last = seen.probs[:, :, :, -1].mean(dim=(1, 2))  # [b, n]
        return value.copy_(last.unsqueeze(1))

    def query_rows(self) -> int:
        return 1


@dataclass(frozen=True)
class ObservationWindowAttention(Statistic):
    """SnapKV's statistic: attention summed over the queries of the last ``window`` positions seen."""

    window: int = 32
    gqa: str = "mean"
    name: str = "observation_window_attention"

    def update(self, value: torch.Tensor, seen: Observation) -> torch.Tensor:
        in_window = seen.query_index >= (seen.seen.view(-1, 1) - self.window)  # [b, r]
        probs = aggregate_group(seen.probs, self.gqa) * in_window.view(in_window.shape[0], 1, -1, 1)
        return value.add_(probs.sum(dim=2))

    def query_rows(self) -> int:
        return self.window  # the newest rows hold the window's positions, padding or not
