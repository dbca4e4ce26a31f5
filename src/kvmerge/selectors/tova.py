"""TOVA (Oren et al. 2024): keep what the newest query attends to most, one choice per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmerge.config import CompressionConfig
from kvmerge.method import Entries, Selector
from kvmerge.stats import CurrentAttention, Statistic


@dataclass(frozen=True)
class TOVA(Selector):
    name = "tova"
    description = "Token Omission Via Attention: keep the largest current attention, averaged over all heads"

    def statistics(self, config: CompressionConfig) -> tuple[Statistic, ...]:
        return (CurrentAttention(),)

    def scores(self, entries: Entries, config: CompressionConfig) -> torch.Tensor:
        return entries.stats[CurrentAttention.name]
