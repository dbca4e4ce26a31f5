"""H2O (Zhang et al. 2023): heavy hitters by accumulated attention plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmerge.config import CompressionConfig
from kvmerge.method import Entries, Selector
from kvmerge.stats import AccumulatedAttention, Statistic


@dataclass(frozen=True)
class H2O(Selector):
    name = "h2o"
    description = "Heavy-Hitter Oracle: keep the largest accumulated attention + a recent window (half each)"
    default_recent = 0.5

    def statistics(self, config: CompressionConfig) -> tuple[Statistic, ...]:
        return (AccumulatedAttention(config.gqa),)

    def scores(self, entries: Entries, config: CompressionConfig) -> torch.Tensor:
        return entries.stats[AccumulatedAttention.name]
