"""Validated options shared by every compression method (METHODS.md, "Common semantics")."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

Schedule = Literal["step", "prefill"]
UNBOUNDED = 1 << 40  # the budget of an adaptive method without a cap
FEW_ENTRIES = 32  # a fraction budget that keeps fewer entries than this per head gets a warning
GroupAggregation = Literal["mean", "max", "sum"]


@dataclass(frozen=True)
class CompressionConfig:
    """How a cache is bounded, independent of which method bounds it.

    Parameters
    ----------
    budget:
        Entries kept per KV head: an ``int`` token count, or a ``float`` in (0, 1] read as a
        fraction of the first forward call's (the prompt's) length, per sequence (a string such as
        ``"256"``, ``"0.2"`` or ``"20%"`` is read by :func:`parse_budget`). ``None`` only for the
        ``full`` method.
    sink:
        First tokens of each sequence that are never evicted. ``None``: the selector's default.
    recent:
        Most recent tokens that are never evicted: an ``int``, or a ``float`` in [0, 1] read as
        a fraction of the budget the sinks leave. ``None``: the selector's default.
    schedule:
        ``"step"``: compress after every chunk of ``chunk_size`` tokens (prefill included) and
        after every decoding step. ``"prefill"``: compress once at the end of the first
        forward call, then only every ``decode_interval`` new tokens (never if ``None``).
    chunk_size:
        Tokens per step of the ``step`` schedule; 1 reproduces token-by-token streaming.
    decode_interval:
        With the ``prefill`` schedule, compress back to the budget every this many new tokens.
    merge_window:
        CaM's ``m``: kept neighbours an evicted value is merged into.
    history_window:
        Scissorhands' ``w``: steps over which low attention is counted (at most 62).
    position_shift:
        StreamingLLM's position shift: after each compression, re-rotate the kept keys so they sit
        contiguously before the next token (RoPE models only). Off: keys keep their true positions.
    gqa:
        How the query heads of a KV group are aggregated into per-KV-head statistics.
    seed:
        Seeds every random choice (CaM's Bernoulli gate).
    """

    budget: int | float | None = None
    sink: int | None = None
    recent: int | float | None = None
    schedule: Schedule = "step"
    chunk_size: int = 32
    decode_interval: int | None = None
    merge_window: int = 16
    history_window: int = 16
    position_shift: bool = False
    gqa: GroupAggregation = "mean"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", parse_budget(self.budget))
        _check_budget(self.budget)
        _check_int("chunk_size", self.chunk_size, minimum=1)
        _check_int("merge_window", self.merge_window, minimum=1)
        _check_int("history_window", self.history_window, minimum=1, maximum=62)
        _check_int("seed", self.seed, minimum=0)
        if self.sink is not None:
            _check_int("sink", self.sink, minimum=0)
        if self.recent is not None:
            if isinstance(self.recent, float):
                if not 0.0 <= self.recent <= 1.0:
                    raise ValueError(f"recent as a float is a fraction of the budget in [0, 1], got {self.recent}")
            else:
                _check_int("recent", self.recent, minimum=0)
        if self.schedule not in ("step", "prefill"):
            raise ValueError(f"schedule must be 'step' or 'prefill', got {self.schedule!r}")
        if self.decode_interval is not None:
            if self.schedule != "prefill":
                raise ValueError("decode_interval applies to the 'prefill' schedule only")
            _check_int("decode_interval", self.decode_interval, minimum=1)
        if not isinstance(self.position_shift, bool):
            raise TypeError(f"position_shift must be a bool, got {type(self.position_shift).__name__}")
        if self.gqa not in ("mean", "max", "sum"):
            raise ValueError(f"gqa must be one of 'mean', 'max', 'sum', got {self.gqa!r}")
        fixed = all(isinstance(v, int) for v in (self.budget, self.sink, self.recent))
        if fixed and self.sink + self.recent > self.budget:
            raise ValueError(f"sink + recent = {self.sink} + {self.recent} exceeds the budget of {self.budget} entries")

    def budgets_for(self, prompt_lengths: torch.Tensor, minimum: int = 1, warn: bool = True) -> torch.Tensor:
        """Entries kept per sequence, ``[batch]`` long, once the prompt lengths ``[batch]`` are known.

        A fraction that resolves below ``minimum`` (what the protected windows need) is raised to it,
        with a warning (``warn``); a fraction that keeps fewer than :data:`FEW_ENTRIES` entries warns too."""
        if not isinstance(self.budget, float):
            return torch.full_like(prompt_lengths, UNBOUNDED if self.budget is None else int(self.budget))
        budgets = (prompt_lengths.double() * self.budget).ceil().long().clamp(min=1)
        fewest = int(budgets.min())
        # one message per budget (Python shows each once), however many prompt lengths a run meets
        if warn and fewest < minimum:
            shorter = math.ceil(minimum / self.budget)
            warnings.warn(
                f"budget {self.budget:g} of a prompt under {shorter} tokens is fewer than the {minimum} entries the "
                f"protected windows (sink/recent) need: raised to {minimum}; pass an int budget to choose",
                UserWarning,
                stacklevel=2,
            )
        elif warn and fewest < FEW_ENTRIES:
            shorter = math.ceil(FEW_ENTRIES / self.budget)
            warnings.warn(
                f"budget {self.budget:g} of a prompt under {shorter} tokens keeps fewer than {FEW_ENTRIES} entries "
                "per head: output quality may collapse; for a short prompt pass an int budget (e.g. 48 entries)",
                UserWarning,
                stacklevel=2,
            )
        return budgets.clamp(min=minimum)

    def minimum_budget(self, default_sink: int, default_recent: float | int) -> int:
        """The fewest entries a sequence's protected windows need (at least 1): the sinks, plus an
        explicit int ``recent`` (a selector's default window and a fraction shrink to fit)."""
        sink = default_sink if self.sink is None else self.sink
        recent = self.recent if isinstance(self.recent, int) else 0
        return max(1, sink + recent)

    def windows_for(
        self, budgets: torch.Tensor, default_sink: int, default_recent: float | int
    ) -> tuple[int, torch.Tensor]:
        """Protected sink count and recent-window sizes ``[batch]`` for per-sequence ``budgets``."""
        sink = default_sink if self.sink is None else self.sink
        recent = default_recent if self.recent is None else self.recent
        if isinstance(recent, float):
            recent_sizes = ((budgets - sink).clamp(min=0).double() * recent).floor().long()
        elif self.recent is None:  # a selector's default window shrinks to fit a small budget
            recent_sizes = (budgets - sink).clamp(min=0, max=recent)
        else:
            recent_sizes = torch.full_like(budgets, recent)
        if bool(((sink + recent_sizes) > budgets).any()):
            needed = self.minimum_budget(default_sink, default_recent)
            raise ValueError(
                f"the protected windows (sink {sink} + recent {recent_sizes.max().item()}) need {needed} entries, "
                f"more than the budget of {budgets.min().item()}: raise the budget to at least {needed} "
                "or lower sink/recent"
            )
        return sink, recent_sizes


def parse_budget(budget: int | float | str | None) -> int | float | None:
    """A budget as :class:`CompressionConfig` takes it: ``"256"`` -> 256 entries per KV head,
    ``"0.2"`` or ``"20%"`` -> the fraction 0.2; ints, floats and ``None`` pass unchanged."""
    if not isinstance(budget, str):
        return budget
    text = budget.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        raise ValueError(
            f"invalid budget {budget!r}: give entries per KV head (e.g. 256) or a fraction (e.g. 0.2 or 20%)"
        ) from None


def _check_budget(budget: object) -> None:
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be an int (tokens) or a float fraction in (0, 1], got {type(budget).__name__}")
    if isinstance(budget, float):
        if math.isnan(budget) or not 0.0 < budget <= 1.0:
            raise ValueError(f"a float budget is a fraction in (0, 1], got {budget}")
    elif budget <= 0:
        raise ValueError(f"budget must be > 0 entries, got {budget}")


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
