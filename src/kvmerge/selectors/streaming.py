"""StreamingLLM (Xiao et al. 2023): attention sinks plus a window of the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmerge.config import CompressionConfig
from kvmerge.method import Entries, Selector


@dataclass(frozen=True)
class Streaming(Selector):
    name = "streaming"
    description = "StreamingLLM: keep `sink` first tokens (4) and the most recent ones; evict the oldest"
    default_sink = 4
    default_recent = 1.0  # all the budget the sinks leave

    def scores(self, entries: Entries, config: CompressionConfig) -> torch.Tensor:
        return entries.index.float()
