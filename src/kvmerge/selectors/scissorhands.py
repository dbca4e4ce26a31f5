"""Scissorhands (Liu et al. 2023): evict the entries that were unimportant most often lately."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmerge.config import CompressionConfig
from kvmerge.method import Entries, Selector
from kvmerge.stats import AttentionHistory, Statistic


@dataclass(frozen=True)
class Scissorhands(Selector):
    name = "scissorhands"
    description = (
        "Scissorhands: evict the entries most often below uniform attention over the last w steps; recent window"
    )
    default_recent = 0.5

    def statistics(self, config: CompressionConfig) -> tuple[Statistic, ...]:
        return (AttentionHistory(config.history_window, below=True, gqa=config.gqa),)

    def scores(self, entries: Entries, config: CompressionConfig) -> torch.Tensor:
        history = entries.stats["low_attention_history"]
        return -AttentionHistory.count(history, config.history_window).float()
