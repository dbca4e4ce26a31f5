"""The two halves of a method: a selector chooses what to evict, an absorber decides what
happens to it. ``Method`` pairs them with a :class:`~kvmerge.config.CompressionConfig`.

Adding a method is one small file: subclass :class:`Selector` or :class:`Absorber`, then
register it in :mod:`kvmerge.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvmerge.config import CompressionConfig
from kvmerge.stats import Statistic


@dataclass(frozen=True)
class Entries:
    """What a cache layer holds, per sequence and KV head.

    Attributes
    ----------
    keys, values:
        ``[batch, kv_heads, n, head_dim]``.
    index:
        ``[batch, kv_heads, n]`` int64 position of each entry within its sequence (padding not
        counted); ``-1`` marks an empty slot (padding, or room another sequence needs). Slots are
        in position order only where the cache says so (see :class:`Eviction`).
    stats:
        Statistics by name, each ``[batch, kv_heads, n]``.
    seen:
        ``[batch]`` tokens each sequence has seen so far (padding not counted).
    layer_idx:
        The model layer these entries belong to: an int, or ``[batch, 1, 1]`` int64 per row when the
        cache compresses several layers at once, their rows stacked along the batch (see
        :class:`~kvmerge.cache.LayerStack`).
    value_sums:
        ``sum_j s_j V_j`` ``[batch, kv_heads, 1, head_dim]`` (float32) over the valid entries, for each
        statistic ``s`` an absorber asked for (:meth:`Absorber.value_sums`), computed with the last
        step's attention (one more row of its value product); absent when not computed.
    """

    keys: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor
    stats: dict[str, torch.Tensor]
    seen: torch.Tensor
    layer_idx: int | torch.Tensor
    value_sums: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Eviction:
    """One compression of a layer: ``before`` shrank to ``after``.

    Slots are in position order in every compression but one: a one-token step that evicts at most one
    entry per row from a method that does not need position order (see ``Selector.needs_position_order``)
    evicts in place instead of compacting the cache. When the slots shrink by one, each row's evicted
    entry (or, in a row that is not over its budget, an empty slot) swaps with the newest one, in the
    last slot: ``before`` is then the swapped layout (the evicted entry last), ``after`` its first
    ``n - 1`` slots (views of the same buffers). Otherwise (rows of a padded batch or with unequal
    budgets, while the slots still grow) the evicted entry's slot becomes empty where it is. Slots of
    a long decoded cache are in no particular order; ``index`` always says each entry's position.

    Attributes
    ----------
    before, after:
        The entries before and after; ``after``'s values may be changed in place (write nothing
        into ``before``'s evicted slots).
    kept_slots:
        ``[batch, kv_heads, k]`` int64 slot in ``before`` of each entry of ``after``; ``-1`` for an
        empty slot (these come first).
    evicted:
        ``[batch, kv_heads, n]`` bool, the valid entries of ``before`` that were evicted.
    state:
        The absorber's own per-layer tensors (empty at first), updated in place.
    evicted_slots:
        ``[batch, kv_heads, e]`` int64 slots in ``before`` of the evicted entries in position order,
        when every row evicted the same number ``e`` (decoding: one), or at most one (see ``evicting``);
        else ``None``.
    ordered:
        Whether ``before``'s slots are in position order (always, unless ``e`` is one).
    windows:
        The protected windows as ``(sink, recent_start)``: an entry is protected when its position is
        below ``sink`` (an int) or at least ``recent_start`` (``[batch, 1, 1]`` int64).
    evicting:
        ``[batch, kv_heads, 1]`` bool, the rows whose one ``evicted_slots`` slot was evicted, when some
        evicted nothing (an in-place step of a padded batch); ``None``: every row evicted its slots.
    """

    before: Entries
    after: Entries
    kept_slots: torch.Tensor
    evicted: torch.Tensor
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    evicted_slots: torch.Tensor | None = None
    ordered: bool = True
    windows: tuple[int, torch.Tensor] | None = None
    evicting: torch.Tensor | None = None


class Selector(ABC):
    """Scores entries; the cache keeps the protected windows plus the best-scored rest.

    An ``adaptive`` selector may score an entry ``-inf`` to evict it even when the cache is under
    budget; a selector with a fixed budget scores finite values (or ``+inf``). Subclasses are
    dataclasses whose fields are the method's own options.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    default_sink: ClassVar[int] = 0
    default_recent: ClassVar[float | int] = 0.0  # float: fraction of the budget after sinks; int: tokens
    compresses: ClassVar[bool] = True
    adaptive: ClassVar[bool] = False  # data-dependent size: the budget is an optional cap
    schedule: ClassVar[str | None] = None  # the only schedule the selector supports, if any
    needs_position_order: ClassVar[bool] = False  # whether scores() reads neighbouring slots as positions
    draws_random: ClassVar[bool] = False  # whether scores() draws from the seed

    def statistics(self, config: CompressionConfig) -> tuple[Statistic, ...]:
        """Statistics this selector reads."""
        return ()

    @abstractmethod
    def scores(self, entries: Entries, config: CompressionConfig) -> torch.Tensor:
        """Keep-priority of each entry ``[batch, kv_heads, n]`` float: higher is kept first."""


class Absorber:
    """Keeps something of what the selector evicts (no absorber: it is dropped).

    Three hooks, each optional: :meth:`merge` reshapes the entries once, at the layer's first
    compression, before the selector runs (KVMerger); :meth:`absorb` folds every eviction into
    what is kept (CaM) or into a state of its own (LESS); :meth:`state_attention` lets queries
    attend to that state. Subclasses are dataclasses whose fields are the method's own options.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    schedule: ClassVar[str | None] = None  # the only schedule the absorber supports, if any
    attends: ClassVar[bool] = False  # whether state_attention contributes
    layerwise: ClassVar[bool] = False  # whether absorb() needs one layer at a time (an int layer_idx)
    needs_position_order: ClassVar[bool] = False  # whether absorb() needs ``before`` in position order

    def statistics(self, config: CompressionConfig) -> tuple[Statistic, ...]:
        """Statistics this absorber reads."""
        return ()

    def draws_random(self) -> bool:
        """Whether absorbing draws from the seed (so that results depend on it)."""
        return False

    def value_sums(self) -> tuple[str, ...]:
        """Statistics ``s`` whose ``sum_j s_j V_j`` the cache computes with each step's attention, for
        :attr:`Entries.value_sums` (a pass over the values that the attention makes anyway)."""
        return ()

    def merge(self, entries: Entries, candidates: torch.Tensor, config: CompressionConfig) -> Entries:
        """Return ``entries`` with some merged; a merged-away entry gets index ``-1``.
        ``candidates`` ``[batch, kv_heads, n]`` bool marks the entries that may be merged."""
        return entries

    def absorb(self, eviction: Eviction, config: CompressionConfig) -> None:
        """Fold the evicted entries into ``eviction.after`` or ``eviction.state`` in place."""

    def state_attention(
        self, state: dict[str, torch.Tensor], queries: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Log-mass ``[b, h, g, r]`` and mean value ``[b, h, g, r, d]`` that the state adds for
        ``queries`` ``[b, h, g, r, d]`` (an extra softmax term), or ``None``."""
        return None


@dataclass(frozen=True)
class Method:
    """A selector, an optional absorber and the options they run with."""

    selector: Selector
    absorber: Absorber | None
    config: CompressionConfig
    statistics: tuple[Statistic, ...] = field(init=False)

    def __post_init__(self) -> None:
        shared: dict[str, Statistic] = {}
        parts = (self.selector, self.absorber) if self.absorber else (self.selector,)
        for part in parts:
            for stat in part.statistics(self.config):
                if shared.setdefault(stat.name, stat) != stat:
                    raise ValueError(f"{stat.name} is requested with two different settings")
        object.__setattr__(self, "statistics", tuple(shared.values()))

    @property
    def name(self) -> str:
        return self.selector.name + (f"+{self.absorber.name}" if self.absorber else "")

    @property
    def needs_position_order(self) -> bool:
        """Whether the cache must keep slots in position order (else decoding evicts in place)."""
        return self.selector.needs_position_order or bool(self.absorber and self.absorber.needs_position_order)

    @property
    def needs_attention(self) -> bool:
        """Whether the cache must compute attention probabilities for this method."""
        return bool(self.statistics) or bool(self.absorber and self.absorber.attends)

    @property
    def observed_rows(self) -> int | None:
        """How many of a step's newest query rows the cache computes attention probabilities for: ``0``
        for none, ``None`` for every row (an attending absorber's state joins every row's softmax)."""
        if not self.needs_attention:
            return 0
        rows = [stat.query_rows() for stat in self.statistics]
        if (self.absorber and self.absorber.attends) or None in rows:
            return None
        return max(rows)
