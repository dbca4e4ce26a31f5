"""SnapKV (Li et al. 2024): the prompt's last queries vote for the entries worth keeping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn.functional import avg_pool1d, max_pool1d

from kvmerge.config import CompressionConfig
from kvmerge.method import Entries, Selector
from kvmerge.stats import ObservationWindowAttention, Statistic

POOLINGS = {"avg": avg_pool1d, "max": max_pool1d}


@dataclass(frozen=True)
class SnapKV(Selector):
    """Attention of the last ``window`` prompt queries on the entries before them, pooled over
    ``kernel`` neighbouring entries (``pooling``: ``"avg"``, as the official code's default and
    kvpress, zero-padded at the prefix's edges; or ``"max"``), top-k per KV head; the observation
    window itself is always kept and never votes for its neighbours."""

    window: int = 32
    kernel: int = 5
    pooling: Literal["avg", "max"] = "avg"

    name = "snapkv"
    description = "SnapKV: top entries by the pooled attention of the prompt's last queries (prefill schedule)"
    schedule = "prefill"
    needs_position_order = True  # pooling reads neighbouring slots

    def __post_init__(self) -> None:
        for field, value in (("window", self.window), ("kernel", self.kernel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"snapkv {field} must be an int >= 1, got {value!r}")
        if self.kernel % 2 == 0:
            raise ValueError(f"snapkv kernel must be odd, got {self.kernel}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"snapkv pooling must be one of {', '.join(map(repr, POOLINGS))}, got {self.pooling!r}")

    @property
    def default_recent(self) -> int:  # type: ignore[override]
        return self.window

    def statistics(self, config: CompressionConfig) -> tuple[Statistic, ...]:
        return (ObservationWindowAttention(self.window, config.gqa),)

    def scores(self, entries: Entries, config: CompressionConfig) -> torch.Tensor:
        votes = entries.stats[ObservationWindowAttention.name]
        batch, heads, n = votes.shape
        # only the entries before the observation window are candidates, and only they are pooled
        prefix = (entries.index >= 0) & (entries.index < (entries.seen.view(-1, 1, 1) - self.window))
        votes = votes.masked_fill(~prefix, 0.0).view(batch * heads, 1, n)
        pooled = POOLINGS[self.pooling](votes, self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.view(batch, heads, n)
