"""Paired comparisons of two methods on the same examples: the mean difference of their per-example
outcomes with a percentile bootstrap interval (examples resampled with replacement, both methods
together, so that what the examples share cancels)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

RESAMPLES = 10_000
_BLOCK = 1 << 24  # resampled outcomes drawn at once


def paired_bootstrap(
    baseline: Sequence[float], other: Sequence[float], resamples: int = RESAMPLES, level: float = 0.95, seed: int = 0
) -> dict[str, float | int | bool]:
    """``mean(other - baseline)`` over paired outcomes (same examples, same order) and its ``level``
    bootstrap interval: ``{"diff", "low", "high", "n", "excludes_zero"}``. Seeded, so a recomputation
    gives the same interval."""
    if len(baseline) != len(other) or not len(baseline):
        raise ValueError(f"paired outcomes need the same examples: got {len(baseline)} and {len(other)}")
    diffs = torch.tensor(other, dtype=torch.float64) - torch.tensor(baseline, dtype=torch.float64)
    n, generator = diffs.numel(), torch.Generator().manual_seed(seed)
    means, per_block = [], max(1, _BLOCK // n)
    for start in range(0, resamples, per_block):
        draws = torch.randint(n, (min(per_block, resamples - start), n), generator=generator)
        means.append(diffs[draws].mean(dim=1))
    tail = (1 - level) / 2
    low, high = torch.quantile(torch.cat(means), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {"diff": float(diffs.mean()), "low": low, "high": high, "n": n, "excludes_zero": low > 0 or high < 0}
