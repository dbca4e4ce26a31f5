"""CORM (Dai et al. 2024): keep a key while any of the last ``window`` queries found it important."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmerge.config import CompressionConfig
from kvmerge.method import Entries, Selector
from kvmerge.stats import AttentionHistory, Statistic


@dataclass(frozen=True)
class CORM(Selector):
    """Key j stays while one of the last ``window`` queries gave it attention >= ``threshold`` / t
    (t = entries that query saw); the last ``recent`` tokens (default: ``window``) always stay.
    The cache size is data dependent; a budget, if given, caps it.
    """

    window: int = 32
    threshold: float = 1.0

    name = "corm"
    description = "CORM: keep keys any of the last w queries gave >= uniform attention; adaptive size, optional cap"
    adaptive = True

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 1 <= self.window <= 62:
            raise ValueError(f"corm window must be an int in [1, 62], got {self.window!r}")
        if not isinstance(self.threshold, (int, float)) or self.threshold <= 0:
            raise ValueError(f"corm threshold must be > 0, got {self.threshold!r}")

    @property
    def default_recent(self) -> int:  # type: ignore[override]
        return self.window

    def statistics(self, config: CompressionConfig) -> tuple[Statistic, ...]:
        return (AttentionHistory(self.window, below=False, threshold=float(self.threshold), gqa=config.gqa),)

    def scores(self, entries: Entries, config: CompressionConfig) -> torch.Tensor:
        count = AttentionHistory.count(entries.stats["important_history"], self.window).float()
        return count.masked_fill(count == 0, float("-inf"))
