"""Key-norm eviction (Devoto et al. 2024): keys with a small L2 norm draw the most attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmerge.config import CompressionConfig
from kvmerge.method import Entries, Selector


@dataclass(frozen=True)
class KNorm(Selector):
    name = "knorm"
    description = "baseline: keep the keys with the smallest L2 norm (no attention needed)"

    def scores(self, entries: Entries, config: CompressionConfig) -> torch.Tensor:
        return -entries.keys.float().norm(dim=-1)
