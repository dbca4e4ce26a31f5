"""Random eviction: the floor every policy must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmerge.config import CompressionConfig
from kvmerge.method import Entries, Selector
from kvmerge.rng import hashed_uniform


@dataclass(frozen=True)
class Random(Selector):
    name = "random"
    description = "baseline: evict uniformly random entries (fresh seeded draws every step)"
    draws_random = True

    def scores(self, entries: Entries, config: CompressionConfig) -> torch.Tensor:
        heads = torch.arange(entries.index.shape[1], device=entries.index.device).view(1, -1, 1)
        return hashed_uniform(config.seed, entries.layer_idx, heads, entries.index, entries.seen.view(-1, 1, 1))
