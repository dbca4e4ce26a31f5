"""The full cache: keeps everything; the reference every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmerge.config import CompressionConfig
from kvmerge.method import Entries, Selector


@dataclass(frozen=True)
class Full(Selector):
    name = "full"
    description = "keep every entry (the reference; same logits as transformers' DynamicCache)"
    compresses = False

    def scores(self, entries: Entries, config: CompressionConfig) -> torch.Tensor:
        return torch.zeros_like(entries.index, dtype=torch.float32)
