"""A transformers ``Cache`` whose layers really evict (and merge) entries.

The cache knows nothing of any particular method: each layer holds keys, values, the
position of every entry and the statistics its :class:`~kvmerge.method.Method` asked for,
and calls the method's selector and absorber when it is over budget.

Timing (METHODS.md): the model calls ``update`` with a forward call's new keys and values,
then its attention function, which is :func:`kvmerge.attention.kvmerge_attention`. That
function hands the queries back to the layer (:meth:`KVMergeLayer.attend`), which processes
them in steps: append a step's entries, attend over the kept cache plus the step, update the
statistics from that attention, compress if over budget. Because a layer's input for every
token is known before the layer runs, doing the steps inside one forward call gives exactly
the result of feeding the tokens one step at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable

import torch
from torch.nn.functional import pad, scaled_dot_product_attention
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvmerge.layer_stack import LayerStack
from kvmerge.method import Entries, Eviction, Method
from kvmerge.positions import KeyRotation
from kvmerge.slots import copy_slots, extend, read_slots
from kvmerge.stats import Observation

_handoff = threading.local()

# Attention rows x entries x query heads computed at once when probabilities are needed.
_BLOCK_ELEMENTS = 1 << 24
# ... and at most this many query rows at once, so that a causal prompt's blocks skip the entries after them.
_BLOCK_ROWS = 128
_NEVER = 1 << 62
_GROWTH = 64  # entries of room a cache that stopped compressing adds when it reallocates


def take_pending_layer() -> KVMergeLayer | None:
    """The layer whose ``update`` ran last in this thread and still awaits its attention call."""
    layer = getattr(_handoff, "layer", None)
    _handoff.layer = None
    return layer


class KVMergeLayer(CacheLayerMixin):
    """One model layer's bounded cache.

    Holds ``keys``/``values`` ``[batch, kv_heads, n, head_dim]``, ``index`` ``[batch, kv_heads, n]``
    (position within the sequence, ``-1`` for an empty slot) and ``stats`` (each
    ``[batch, kv_heads, n]``). ``seen`` counts every token the layer was given (padding included),
    which is what transformers derives positions from; ``n`` counts what is kept.

    Memory: while decoding (steps of one token), a compressing layer's per-entry tensors (keys,
    values, positions, statistics) are views of the first ``n`` entries of buffers with room for one
    more entry, so that appending the next token writes into that room instead of reallocating the
    cache. A decoding step that puts every row one entry over budget then evicts in place: each row's
    evicted entry swaps slots with the newest entry and the last slot becomes the room again, so
    nothing is copied but two entries per row. Slots then drift out of position order (``index``
    says each entry's position); a compression that evicts several entries, or a method that needs
    position order (:attr:`~kvmerge.method.Method.needs_position_order`), gathers the kept entries
    in position order into fresh buffers.
    """

    is_sliding = False
    is_croppable = False

    def __init__(
        self, method: Method, layer_idx: int, key_rotation: KeyRotation | None = None, record_evictions: bool = False
    ):
        super().__init__()
        self.method = method
        self.layer_idx = layer_idx
        self.key_rotation = key_rotation
        self.record_evictions = record_evictions
        self.stack: LayerStack | None = None  # set by the cache whose layers compress decoding steps together
        self.compressing = True  # False: keep every new token (a fork answering a question)
        self.seen = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        # decoding's single evictions happen in place unless the method needs slots in position order
        self._evicts_in_place = key_rotation is None and not method.needs_position_order
        self._sum_names = method.absorber.value_sums() if method.absorber is not None else ()
        self._value_sums: dict[str, torch.Tensor] = {}  # Entries.value_sums of the last step

    # transformers' layer API -------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.index = torch.empty(batch, heads, 0, dtype=torch.long, device=self.device)
        self.stats = {
            s.name: torch.zeros(batch, heads, 0, dtype=s.dtype, device=self.device) for s in self.method.statistics
        }
        self.valid_seen = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.rotated_at = self.index.clone()  # the position each key is rotated at (position shift)
        self.budgets: torch.Tensor | None = None
        self.has_empty = False  # whether any slot holds no entry (index -1)
        self.compressions = 0
        self.absorber_state: dict[str, torch.Tensor] = {}
        # evicted_at[b, h, p]: the step (position of the newest token) after which position p left the cache
        self.evicted_at = torch.empty(batch, heads, 0, dtype=torch.long, device=self.device)
        self.since_compression = 0
        self._buffers: dict[str, torch.Tensor] = {}  # what the per-entry tensors are views of, by name
        self._step_rows = 0  # rows of the last step appended
        self.ordered = True  # whether slots are in position order
        self._constants: dict[tuple, torch.Tensor] = {}
        self._slots_of_shape: tuple = ((), None, None, None)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Receive a forward call's new keys/values ``[batch, kv_heads, q, head_dim]``; the attention
        function stores them (see the module docstring)."""
        if self._pending is not None or take_pending_layer() is not None:
            self._pending = None
            raise RuntimeError(
                "kvmerge cache: the model's attention did not go through kvmerge. Create the cache with "
                "kvmerge.make_cache(model, ...), which switches the model to the 'kvmerge' attention implementation."
            )
        if self.is_initialized and key_states.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"kvmerge cache holds a batch of {self.keys.shape[0]} sequences, this call has {key_states.shape[0]}: "
                "call cache.reset() (or make a new cache) for a new batch"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = (key_states, value_states)
        _handoff.layer = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.stack is not None:
            self.stack.settle()
        kept = self.keys.shape[-2] if self.is_initialized else 0
        return kept + query_length, self.seen - kept

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.stack is not None:
            self.stack.pending.clear()
            self.stack.unstack()
        self.is_initialized = False
        self.keys = self.values = None
        self.seen = 0
        self._pending = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a compressed cache cannot be rolled back (assisted decoding needs DynamicCache)")

    # kvmerge -----------------------------------------------------------------------------

    def fork(self, copies: int = 1) -> KVMergeLayer:
        """A copy of this layer with tensors of its own, each sequence repeated ``copies`` times (sequence
        ``b`` becomes ``b * copies`` to ``b * copies + copies - 1``); it belongs to no layer stack."""
        if self.stack is not None:
            self.stack.settle()
        twin = copy.copy(self)
        twin.stack, twin._pending, twin._constants = None, None, {}
        twin._map_batch(lambda t: t.repeat_interleave(copies, dim=0) if copies > 1 else t.clone())
        return twin

    @property
    def entries(self) -> Entries:
        index, seen = self.index, self.valid_seen
        return Entries(self.keys, self.values, index, self.stats, seen, self.layer_idx, self._value_sums)

    def attend(
        self, module: torch.nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs
    ) -> torch.Tensor:
        """Run this forward call's attention in steps, compressing between them.

        ``query`` is ``[batch, q_heads, q, head_dim]``; ``attention_mask`` is transformers' mask for
        the call. Returns the attention output ``[batch, q, q_heads, head_dim]``.
        """
        if self.stack is not None and self in self.stack.pending:  # a model that skipped the last layer
            self.stack.settle()
        new_keys, new_values = self._pending
        self._pending = None
        length = new_keys.shape[-2]
        if length > 1 and self.seen > 0 and self.layer_idx == 0:  # every layer sees the same positions
            self._check_continues(kwargs.get("position_ids"))
        if attention_mask is None:
            valid = self._true(query.shape[0], length)
        else:
            valid = _new_token_validity(attention_mask, self.keys.shape[-2], length, query.shape[0], self.device)
        padded = attention_mask is not None and not bool(valid.all())
        first_call = self.seen == 0
        method, config = self.method, self.method.config
        if self.budgets is None and method.selector.compresses:
            self.set_budgets(valid.sum(-1))
        if not method.selector.compresses:
            # Nothing is ever evicted, so transformers' own mask is exact: behave as DynamicCache.
            self._append(new_keys, new_values, valid, padded)
            out, _ = sdpa_attention_forward(module, query, self.keys, self.values, attention_mask, **kwargs)
            return out
        step = length if config.schedule == "prefill" else config.chunk_size
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        outputs, deferred = [], False
        # Steps end at the call's last token, so left padding never shifts a sequence's step boundaries.
        for stop in range(length, 0, -step)[::-1]:
            start = max(stop - step, 0)
            keys, values, step_valid = (_span(t, start, stop) for t in (new_keys, new_values, valid))
            self._append(keys, values, step_valid, padded)
            outputs.append(self._attend_step(_span(query, start, stop), step_valid, scaling))
            if self._should_compress(first_call):
                deferred = length == 1 and self._defer()
                if not deferred:
                    self.compress()
        if self.stack is not None:
            self.stack.attended(self, deferred)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _check_continues(self, position_ids: torch.Tensor | None) -> None:
        """Refuse a call whose tokens ``position_ids`` ``[batch, q]`` end before what the cache holds:
        a new prompt on a cache still holding an earlier one (generate reuses positions from 0)."""
        if position_ids is not None and int(position_ids[:, -1].max()) < int(self.valid_seen.min()):
            raise ValueError(
                f"kvmerge cache holds {self.seen} tokens of an earlier sequence and this call starts over at "
                f"position {int(position_ids[:, 0].min())}: call cache.reset() (or make a new cache) for a new prompt"
            )

    def set_budgets(self, prompt_lengths: torch.Tensor) -> None:
        """Fix each sequence's budget and protected windows from its prompt length ``[batch]``."""
        selector, config = self.method.selector, self.method.config
        minimum = config.minimum_budget(selector.default_sink, selector.default_recent)
        warn = self.layer_idx == 0  # once per cache
        self.budgets = config.budgets_for(prompt_lengths.to(self.device), minimum, warn=warn)
        self.budget_max, self.budget_min = int(self.budgets.max()), int(self.budgets.min())
        self.sink, self.recent = config.windows_for(self.budgets, selector.default_sink, selector.default_recent)

    def compress(self) -> None:
        """Shrink every sequence to its budget: protected windows first, then by the selector's scores."""
        before = self.entries
        recent_start = (self.valid_seen - self.recent).view(-1, 1, 1)
        protected = (before.index < self.sink) | (before.index >= recent_start)
        absorber = self.method.absorber
        if absorber is not None and self.compressions == 0:
            merged = absorber.merge(before, (before.index >= 0) & ~protected, self.method.config)
            before = before if merged is before else dataclasses.replace(merged, value_sums={})  # sums of old values
        scores = _cast(self.method.selector.scores(before, self.method.config), torch.float32).masked_fill(
            protected, float("inf")
        )
        n = before.index.shape[-1]
        # Decoding puts one entry over budget: drop the lowest without ranking the rest.
        dropped = self._lowest(scores, before.index) if self._one_over_budget(n) else None
        if dropped is not None and self._evicts_in_place:
            self._evict_in_place(before, dropped, (self.sink, recent_start))
            return
        over = self._over_by_one(before.index) if dropped is None else None
        if over is not None:  # a one-token step of a padded batch or of unequal budgets
            self._evict_one_or_none(before, scores, over, (self.sink, recent_start))
            return
        if not self.ordered:  # in-place evictions came before: rank in position order
            before, scores = self._reorder(scores)
        chosen = self._drop(dropped, n) if dropped is not None else self._rank(scores, before.index)
        kept_slots, slots, evicted, evicted_slots = chosen
        # Gather the kept entries (in position order) into fresh buffers, with room for the next step.
        kept, room = slots.shape[-1], int(self._step_rows == 1)  # decoding: room for the next token
        if room:
            slots = torch.cat([slots, slots[..., -1:].expand(*slots.shape[:2], room)], dim=-1)
        self._buffers = {name: read_slots(t, slots) for name, t in self._named(before).items()}
        held = {name: buffer.narrow(2, 0, kept) for name, buffer in self._buffers.items()}
        has_empty = dropped is None and bool((kept_slots < 0).any())
        if has_empty:
            held["index"] = torch.where(kept_slots >= 0, held["index"], -1)
        self._finish(held, lambda: Eviction(
            before, self._entries(held), kept_slots, evicted(), self.absorber_state, evicted_slots,
            windows=(self.sink, recent_start),  # the protected windows, for absorbers that read them
        ))  # fmt: skip
        self.has_empty = has_empty
        if self.key_rotation is not None:
            self._shift_positions()

    def _evict_in_place(
        self,
        before: Entries,
        dropped: torch.Tensor,
        windows: tuple[int, torch.Tensor],
        evicting: torch.Tensor | None = None,
    ) -> None:
        """Evict each row's ``dropped`` slot ``[b, h, 1]`` without compaction: swap it with the last slot
        (the newest entry) in every per-entry tensor and let the buffers keep that slot as room;
        ``windows`` as :attr:`~kvmerge.method.Eviction.windows`; ``evicting`` ``[b, h, 1]``: the rows whose
        dropped slot holds an entry (``None``: all; the others give up an empty slot)."""
        n = before.index.shape[-1]
        kept_slots, evicted, last = self._in_place_slots(*dropped.shape[:2], n)  # last: [b, h, 1]
        if evicting is not None:
            evicted = evicted & evicting
        pair, swapped = torch.cat((dropped, last), dim=-1), torch.cat((last, dropped), dim=-1)  # [b, h, 2]
        named = self._named(before)
        copy_slots(list(named.values()), pair, swapped)  # swap the two entries
        held = {name: tensor.narrow(2, 0, n - 1) for name, tensor in named.items()}

        def eviction() -> Eviction:
            return Eviction(
                before, self._entries(held), kept_slots, evicted, self.absorber_state, last, False, windows, evicting
            )

        self._finish(held, eviction)
        self._buffers.update(named)  # the evicted entries' slots are the room for the next step
        self.ordered = False

    def _over_by_one(self, index: torch.Tensor) -> torch.Tensor | None:
        """Which rows ``[b, h, 1]`` hold one valid entry over their budget, when a one-token step left no
        row further over and the in-place eviction applies; else ``None`` (compaction ranks)."""
        if not (
            self._evicts_in_place
            and self._step_rows == 1
            and self.compressions > 0
            and not self.method.selector.adaptive
        ):
            return None
        over = (index >= 0).sum(-1, keepdim=True) - self.budgets.view(-1, 1, 1)
        return None if bool((over > 1).any()) else over > 0

    def _evict_one_or_none(
        self, before: Entries, scores: torch.Tensor, over: torch.Tensor, windows: tuple[int, torch.Tensor]
    ) -> None:
        """Evict in place the lowest-scored entry of each row that is ``over`` ``[b, h, 1]`` its budget, and
        nothing of the others. When the slots are one more than the largest budget, every row gives up
        one slot (an empty one if it is not over) and the slots shrink by one, as :meth:`_evict_in_place`;
        otherwise the evicted entries' slots become empty where they are."""
        n = before.index.shape[-1]
        valid = before.index >= 0
        # The slot each row gives up: its lowest valid entry if over budget, else an empty slot.
        priority = torch.where(valid == over, torch.where(valid, scores, float("-inf")), float("inf"))
        dropped = self._lowest(priority, before.index)
        if n == self.budget_max + 1:
            self._evict_in_place(before, dropped, windows, over)
            return
        evicted = over & (torch.arange(n, device=self.device) == dropped)  # [b, h, n]
        held = self._named(before)
        held["index"] = before.index.masked_fill(evicted, -1)
        kept_slots = torch.arange(n, device=self.device).expand_as(evicted).masked_fill(evicted, -1)

        def eviction() -> Eviction:
            return Eviction(
                before, self._entries(held), kept_slots, evicted, self.absorber_state, dropped, self.ordered, windows,
                evicting=over,
            )  # fmt: skip

        self._finish(held, eviction)
        self.has_empty = True

    def _in_place_slots(self, batch: int, heads: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An in-place eviction's kept slots ``[batch, heads, n - 1]`` (the first ``n - 1``), evicted mask
        ``[batch, heads, n]`` and slot ``[batch, heads, 1]`` (the last); the same every step, so kept
        (read-only)."""
        if self._slots_of_shape[0] != (batch, heads, n):
            slots = torch.arange(n, device=self.device)
            kept_slots = slots[: n - 1].expand(batch, heads, n - 1)
            evicted = (slots == n - 1).expand(batch, heads, n)
            self._slots_of_shape = ((batch, heads, n), kept_slots, evicted, slots[n - 1 :].expand(batch, heads, 1))
        return self._slots_of_shape[1:]

    def _finish(self, held: dict[str, torch.Tensor], eviction: Callable[[], Eviction]) -> None:
        """Hand the ``eviction`` (built only if needed) to the absorber and the eviction record, then
        hold the kept per-entry tensors ``held``."""
        if self.method.absorber is not None or self.record_evictions:
            done = eviction()
            if self.method.absorber is not None:
                self.method.absorber.absorb(done, self.method.config)
            if self.record_evictions:
                self._record(done.before.index, done.evicted)
        self._hold(held)
        self.since_compression = 0
        self.compressions += 1

    def _reorder(self, scores: torch.Tensor) -> tuple[Entries, torch.Tensor]:
        """Put the slots back in position order, and ``scores`` ``[b, h, n]`` with them."""
        order = self.index.argsort(dim=-1)
        self._hold({name: read_slots(t, order) for name, t in self._named(self.entries).items()})
        self._buffers = {}
        self.ordered = True
        return self.entries, read_slots(scores, order)

    def _defer(self) -> bool:
        """Leave this decoding step's compression to the layer stack, if it is an in-place eviction the
        stack can do (see :class:`LayerStack`)."""
        absorber = self.method.absorber
        deferred = (
            self.stack is not None
            and self._evicts_in_place
            and not self.record_evictions
            and (absorber is None or not absorber.layerwise)
            and self._one_over_budget(self.index.shape[-1])
        )
        if deferred:
            self.stack.pending.append(self)
        return deferred

    def _one_over_budget(self, n: int) -> bool:
        """Whether every row holds exactly its budget plus one valid entry (the decoding step)."""
        return (
            n == self.budget_max + 1
            and self.budget_min == self.budget_max
            and not self.has_empty
            and not self.method.selector.adaptive
            and self.compressions > 0  # an absorber's merge (first compression only) may empty slots
        )

    @staticmethod
    def _lowest(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Each row's lowest-scored slot ``[b, h, 1]``, the newest among equal scores (what the stable
        ranking of :meth:`_rank` drops; an empty slot, index ``-1``, among empty ones), in any slot order."""
        lowest = scores.amin(dim=-1, keepdim=True)
        return index.masked_fill(scores != lowest, -2).argmax(dim=-1, keepdim=True)

    @staticmethod
    def _drop(dropped: torch.Tensor, n: int) -> tuple:
        """What :meth:`_rank` returns when each row of ``n`` slots in position order drops ``dropped``
        ``[b, h, 1]``, and ``dropped``."""
        kept = torch.arange(n - 1, device=dropped.device)
        kept_slots = kept + (kept >= dropped)  # [b, h, n - 1], in position order
        return kept_slots, kept_slots, lambda: torch.arange(n, device=dropped.device) == dropped, dropped

    def _rank(self, scores: torch.Tensor, index: torch.Tensor) -> tuple:
        """Keep each row's best ``budget`` valid entries by ``scores``: the kept slots in position order
        ``[b, h, k]`` (``-1`` first for empty slots), the slots to gather (an empty slot takes an evicted
        entry's, its index then says ``-1``), a function giving the evicted entries ``[b, h, n]``, and
        ``None`` (rows may evict different counts)."""
        valid = index >= 0
        scores = scores.masked_fill(~valid, float("-inf"))
        kept = min(index.shape[-1], self.budget_max)
        # Stable sort: among equal scores the older entry wins, alone or in any batch.
        ranked_scores, ranked = torch.sort(scores, dim=-1, descending=True, stable=True)
        ranked_scores, ranked = ranked_scores[..., :kept], ranked[..., :kept]
        rank = torch.arange(kept, device=self.device)
        keep = (rank < self.budgets.view(-1, 1, 1)) & (ranked_scores > float("-inf"))
        if self.method.selector.adaptive:  # rows keep different counts: hold the largest
            kept = int(keep.sum(-1).max())
            ranked, keep = ranked[..., :kept], keep[..., :kept]
        kept_slots, order = torch.sort(torch.where(keep, ranked, -1), dim=-1)
        slots = ranked.gather(-1, order)

        def evicted() -> torch.Tensor:
            out = valid.clone()
            out.scatter_(-1, slots, ~keep.gather(-1, order) & out.gather(-1, slots))
            return out

        return kept_slots, slots, evicted, None

    def _named(self, entries: Entries) -> dict[str, torch.Tensor]:
        """Every per-entry tensor ``[batch, kv_heads, n, ...]`` of ``entries`` by name (with this layer's
        rotation state when it shifts positions)."""
        named = {"keys": entries.keys, "values": entries.values, "index": entries.index}
        named.update((f"stats.{name}", value) for name, value in entries.stats.items())
        if self.key_rotation is not None:
            named["rotated_at"] = self.rotated_at
        return named

    def _entries(self, named: dict[str, torch.Tensor]) -> Entries:
        """The :class:`Entries` of per-entry tensors by name (the inverse of :meth:`_named`)."""
        stats = {name: named[f"stats.{name}"] for name in self.stats}
        return Entries(named["keys"], named["values"], named["index"], stats, self.valid_seen, self.layer_idx)

    def _hold(self, named: dict[str, torch.Tensor]) -> None:
        """Make the per-entry tensors by name (see :meth:`_named`) the layer's."""
        entries = self._entries(named)
        self.keys, self.values, self.index, self.stats = entries.keys, entries.values, entries.index, entries.stats
        if self.key_rotation is not None:
            self.rotated_at = named["rotated_at"]

    def _record(self, index: torch.Tensor, evicted: torch.Tensor) -> None:
        """Note in ``evicted_at`` which positions ``index`` ``[b, h, n]`` were just ``evicted``."""
        grow = int(self.valid_seen.max()) - self.evicted_at.shape[-1]
        if grow > 0:
            self.evicted_at = pad(self.evicted_at, (0, grow), value=_NEVER)
        step = (self.valid_seen - 1).view(-1, 1, 1).expand_as(index)
        current = self.evicted_at.gather(-1, index.clamp(min=0))
        self.evicted_at.scatter_(-1, index.clamp(min=0), torch.where(evicted, step, current))

    def _shift_positions(self) -> None:
        """Re-rotate kept keys so the valid ones sit contiguously just before the next token."""
        kept = self.index >= 0
        behind = kept.flip(-1).long().cumsum(-1).flip(-1)  # kept entries at or after each slot
        target = torch.where(kept, self.valid_seen.view(-1, 1, 1) - behind, self.rotated_at)
        self.keys = self.key_rotation.rotate(self.keys, target - self.rotated_at)
        self.rotated_at = target

    def kv_bytes(self) -> int:
        """Bytes of keys and values actually held."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def kv_bytes_full(self) -> int:
        """Bytes a full cache would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        batch, heads, _, dim = self.keys.shape
        return batch * heads * self.seen * dim * (self.keys.element_size() + self.values.element_size())

    def stats_bytes(self) -> int:
        """Bytes of positions and statistics kept beside the entries."""
        if not self.is_initialized:
            return 0
        tensors = [self.index, *self.stats.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    # internals ---------------------------------------------------------------------------

    def _append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, padded: bool) -> None:
        """Add a step's entries ``[batch, kv_heads, r, head_dim]`` with their validity ``[batch, r]``;
        ``padded`` says whether the forward call has padding at all."""
        batch, heads, rows = keys.shape[:3]
        if padded and self.method.selector.compresses and not bool(valid.all()):
            self.has_empty = True
            keys = keys * valid.view(batch, 1, rows, 1)  # padding never carries NaN into merges
            values = values * valid.view(batch, 1, rows, 1)
        if padded and rows == 1:
            self._step_index = torch.where(valid, self.valid_seen.view(-1, 1), -1)  # [batch, 1]
        elif padded:
            positions = self.valid_seen.view(-1, 1) + valid.long().cumsum(-1) - 1
            self._step_index = torch.where(valid, positions, -1)  # [batch, r]
        elif rows == 1:  # decoding, no padding
            self._step_index = self.valid_seen.view(-1, 1)  # valid_seen is replaced, never changed in place
        else:  # every token of the call is real
            self._step_index = self.valid_seen.view(-1, 1) + torch.arange(rows, device=self.device)
        index = self._step_index.unsqueeze(1).expand(batch, heads, rows)
        new = {"keys": keys, "values": values, "index": index}
        for stat in self.method.statistics:
            new[f"stats.{stat.name}"] = self._constant(0, stat.dtype, (batch, heads, rows))
        if self.key_rotation is not None:
            new["rotated_at"] = index
        held = self._named(self.entries)
        if self.method.selector.compresses:
            # Decoding keeps room for the next token while under budget; over it, this step's eviction
            # frees a slot (in place) or compaction makes fresh buffers.
            room = int(rows == 1 and self.index.shape[-1] + rows <= self.budget_max)
            if not self.compressing:  # the cache grows: room for the next steps, not one reallocation each
                room = _GROWTH
            for name, fresh in new.items():
                held[name], self._buffers[name] = extend(held[name], fresh, self._buffers.get(name), room)
        else:  # as DynamicCache: no room kept
            held = {name: torch.cat([held[name], fresh], dim=2) for name, fresh in new.items()}
        self._hold(held)
        self._step_rows = rows
        self.valid_seen = self.valid_seen + ((valid[:, 0] if rows == 1 else valid.sum(-1)) if padded else rows)
        self.seen += rows
        self.since_compression += rows

    def _step_mask(self, valid: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        """Which entries the step's rows ``start:stop`` see ``[batch, kv_heads, stop - start, m]`` (one head,
        broadcast, when no slot is empty), over the first ``m`` entries, those before the step's token
        ``stop``: the valid kept entries, and the step's valid tokens causally. A row always sees itself,
        so padding rows stay finite (nothing valid ever sees padding). ``None`` when a single row sees
        everything. ``valid`` ``[batch, r]`` says which of the step's ``r`` tokens are real."""
        rows, n = valid.shape[-1], self.index.shape[-1]
        stop = rows if stop is None else stop
        if rows == 1:  # the row sees the valid kept entries and itself
            if not self.has_empty:
                return None
            mask = (self.index >= 0).unsqueeze(2)
            mask[..., -1] = True
            return mask
        query = torch.arange(start, stop, device=self.device).view(-1, 1)
        token = torch.arange(stop, device=self.device)
        new = ((token <= query) & valid[:, None, None, :stop]) | (token == query)  # [batch, 1, stop - start, stop]
        if self.has_empty:
            old = (self.index[..., : n - rows] >= 0).unsqueeze(2).expand(-1, -1, stop - start, -1)
        else:
            old = self._true(1, 1, 1, 1).expand(new.shape[0], 1, stop - start, n - rows)
        return torch.cat([old, new.expand(-1, old.shape[1], -1, -1)], dim=-1)

    def _attend_step(self, query: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of a step's queries ``[batch, q_heads, r, head_dim]`` -> ``[batch, r, q_heads, head_dim]``.

        A method that reads the probabilities of every row gets them with the output, in one explicit
        pass. Otherwise the step attends with SDPA, as the full cache does (the whole prompt, for the
        ``prefill`` schedule), and only the rows the method reads
        (:attr:`~kvmerge.method.Method.observed_rows`, the step's newest) get their probabilities computed."""
        rows = query.shape[2]
        observed = self.method.observed_rows
        if not self.compressing and observed != 0:  # no statistic is read again; an attending state still joins
            observed = None if self.method.absorber is not None and self.method.absorber.attends else 0
        if observed is None or observed >= rows:
            return self._attend_observed(query, valid, scaling, 0, output=True)
        out = self._attend_sdpa(query, valid, scaling)
        if observed:
            self._attend_observed(query, valid, scaling, rows - observed, output=False)
        return out

    def _attend_sdpa(self, query: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of a step's queries ``[batch, q_heads, r, head_dim]`` (``valid`` ``[batch, r]``) with SDPA
        -> ``[batch, r, q_heads, head_dim]``."""
        batch, q_heads, rows, dim = query.shape
        heads = self.keys.shape[1]
        group = q_heads // heads
        if rows == 1:
            # One query row (decoding): a KV group's query heads are rows of one attention over their KV
            # head, cheaper on CPU than SDPA's GQA; the mask [b, kv_heads, 1, n] (empty slots) broadcasts.
            grouped = query.reshape(batch, heads, group, dim)
            mask = self._step_mask(valid)
            out = scaled_dot_product_attention(grouped, self.keys, self.values, attn_mask=mask, scale=scaling)
            return out.reshape(batch, q_heads, 1, dim).transpose(1, 2)
        mask, causal = None, True  # the step is all the layer holds, unpadded: no mask to build
        if self.keys.shape[-2] != rows or self.has_empty:
            mask, causal = self._step_mask(valid), False
            mask = mask.repeat_interleave(group, dim=1) if mask.shape[1] > 1 else mask
        out = scaled_dot_product_attention(
            query, self.keys, self.values, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=group > 1
        )
        return out.transpose(1, 2)

    def _attend_observed(
        self, query: torch.Tensor, valid: torch.Tensor, scaling: float, first: int, output: bool
    ) -> torch.Tensor | None:
        """Attention of a step's rows ``first:`` of ``query`` ``[batch, q_heads, r, head_dim]`` ->
        ``[batch, r - first, q_heads, head_dim]`` (``None`` without ``output``: the probabilities only),
        with their probabilities fed to the statistics.

        Rows go in blocks, each over the entries it can see (the kept ones and the step's tokens up to
        its last row: a causal prompt costs half the square), computed in float32."""
        batch, q_heads, rows, dim = query.shape
        n, heads = self.keys.shape[-2], self.keys.shape[1]
        group = q_heads // heads
        absorber = self.method.absorber
        block = max(1, min(_BLOCK_ROWS, _BLOCK_ELEMENTS // max(1, n * q_heads)))
        grouped = query.reshape(batch, heads, group, rows, dim)
        keys, values = _cast(self.keys, torch.float32).transpose(-1, -2), _cast(self.values, torch.float32)
        outputs = []
        for start in range(first, rows, block):
            stop = min(start + block, rows)
            seen = n - rows + stop  # entries these rows can see
            q = _cast(_span(grouped, start, stop, dim=3), torch.float32).reshape(batch, heads, -1, dim)
            scores = torch.matmul(q * scaling, _span(keys, 0, seen, dim=3))
            scores = scores.view(batch, heads, group, stop - start, seen)
            block_mask = self._step_mask(valid, start, stop)  # [b, h or 1, stop - start, seen]
            if block_mask is None:
                visible = self._true(1, 1, 1, seen)
            else:
                # no empty slot, no padding: the rows see every entry before the block's first token
                hidden = 0 if self.has_empty else n - rows + start
                scores[..., hidden:].masked_fill_(~block_mask[..., hidden:].unsqueeze(2), float("-inf"))
                visible = block_mask[:, :1] & valid[:, start:stop].view(batch, 1, -1, 1)
            seen_values = _span(values, 0, seen)
            extra, fused = None, False
            if absorber is not None and absorber.attends:
                extra = absorber.state_attention(self.absorber_state, q.view(*scores.shape[:4], dim), self.layer_idx)
            if extra is None:
                probs = scores.softmax(dim=-1)
                fused = output and stop == rows and bool(self._sum_names)  # the value sums as rows of this product
                if fused or not output:  # the statistics first, so the value sums see this step's attention too
                    self._update_statistics(probs, visible, start, stop)
                if not output:
                    continue
                weights = probs.view(batch, heads, -1, seen)
                if fused:
                    weights = torch.cat([weights, self._sum_weights()], dim=2)
                out = torch.matmul(weights, seen_values)
                if fused:  # copied out, so that the step's whole product is not kept alive by them
                    self._keep_value_sums(out[:, :, -len(self._sum_names) :].clone())
                    out = out[:, :, : -len(self._sum_names)]
            else:  # the state is one more softmax term with log-weight log_mass and value mean
                log_mass, mean = extra
                top = torch.maximum(scores.amax(dim=-1), log_mass)
                weights = torch.exp(scores - top.unsqueeze(-1))
                state_weight = torch.exp(log_mass - top)
                total = weights.sum(dim=-1) + state_weight
                probs = weights / weights.sum(dim=-1, keepdim=True)  # statistics see the kept entries only
                kept = torch.matmul(weights.view(batch, heads, -1, seen), seen_values).view_as(mean)
                out = (kept + state_weight.unsqueeze(-1) * mean) / total.unsqueeze(-1)
            outputs.append(_cast(out.reshape(batch, heads, group, stop - start, dim), query.dtype))
            if not fused:
                self._update_statistics(probs, visible, start, stop)
        if self._sum_names and not fused:  # an attending absorber, or no output: one more pass
            self._keep_value_sums(torch.matmul(self._sum_weights(), values))
        if not output:
            return None
        out = (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=3)).reshape(batch, q_heads, -1, dim)
        return out.transpose(1, 2)

    def _update_statistics(self, probs: torch.Tensor, visible: torch.Tensor, start: int, stop: int) -> None:
        """Feed the probabilities ``[b, h, g, r, m]`` of the step's rows ``start:stop`` over the first ``m``
        entries (those the rows can see) to the statistics."""
        seen = Observation(probs, visible, _span(self._step_index, start, stop), self.valid_seen)
        for stat in self.method.statistics:  # the entries after the first m are unseen: untouched
            part = self.stats[stat.name].narrow(-1, 0, probs.shape[-1])
            updated = stat.update(part, seen)
            if updated is not part:
                part.copy_(updated)

    def _keep_value_sums(self, sums: torch.Tensor) -> None:
        """Hold the value sums ``[b, h, s, d]`` (a row per name of ``_sum_names``) as ``Entries.value_sums``."""
        names = self._sum_names
        self._value_sums = {names[0]: sums} if len(names) == 1 else dict(zip(names, sums.split(1, dim=2), strict=True))

    def _sum_weights(self) -> torch.Tensor:
        """The statistics of :attr:`_sum_names` as weight rows ``[b, h, s, n]`` float32 (0 for an empty slot)."""
        stats = [self.stats[name] for name in self._sum_names]
        rows = _cast(stats[0].unsqueeze(2) if len(stats) == 1 else torch.stack(stats, dim=2), torch.float32)
        return rows.masked_fill(self.index.unsqueeze(2) < 0, 0.0) if self.has_empty else rows

    def _true(self, *shape: int) -> torch.Tensor:
        """An all-true bool tensor of ``shape``, kept between steps (read-only)."""
        return self._constant(True, torch.bool, shape)

    def _constant(self, value: float, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of ``shape`` filled with ``value``, kept between steps (read-only)."""
        key = (value, dtype, shape)
        if key not in self._constants:
            if len(self._constants) > 8:  # shapes of earlier steps
                self._constants.clear()
            self._constants[key] = torch.full(shape, value, dtype=dtype, device=self.device)
        return self._constants[key]

    def _should_compress(self, first_call: bool) -> bool:
        if not self.compressing:
            return False
        config = self.method.config
        interval = config.decode_interval
        if config.schedule == "prefill" and not first_call and (interval is None or self.since_compression < interval):
            return False
        if self.index.shape[-1] > self.budget_max or self.method.selector.adaptive:
            return True
        if self.budget_min == self.budget_max:  # nobody holds more valid entries than there are slots
            return False
        return bool(((self.index >= 0).sum(-1).amax(-1) > self.budgets).any())

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.stack is not None:  # the rows move to new buffers
            self.stack.settle()
            self.stack.unstack()
        if not self.is_initialized:
            return
        self.keys, self.values, self.index, self.rotated_at, self.evicted_at = map(
            fn, (self.keys, self.values, self.index, self.rotated_at, self.evicted_at)
        )
        self._buffers = {}
        self.stats = {name: fn(value) for name, value in self.stats.items()}
        self.valid_seen = fn(self.valid_seen)
        self.absorber_state = {name: fn(value) for name, value in self.absorber_state.items()}
        self._value_sums = {name: fn(value) for name, value in self._value_sums.items()}
        if self.budgets is not None:
            self.budgets, self.recent = fn(self.budgets), fn(self.recent)


class KVMergeCache(Cache):
    """A transformers ``Cache`` bounded by a :class:`~kvmerge.method.Method`; build it with
    :func:`kvmerge.make_cache`. ``compress_together`` lets a :class:`LayerStack` compress the layers'
    decoding steps at once (the same result; off: layer by layer, for comparison)."""

    def __init__(
        self,
        method: Method,
        num_layers: int,
        key_rotation: KeyRotation | None = None,
        record_evictions: bool = False,
        compress_together: bool = True,
    ):
        layers = [KVMergeLayer(method, i, key_rotation, record_evictions) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.method = method
        if compress_together:
            stack = LayerStack(layers)
            for layer in layers:
                layer.stack = stack

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx].update(key_states, value_states)

    def fork(self, copies: int = 1, compressing: bool = False) -> KVMergeCache:
        """A cache holding what this one holds, with tensors of its own (what runs on the fork leaves this
        cache as it is), every sequence repeated ``copies`` times: answer ``copies`` questions about one
        compressed context as one batch. ``compressing=False`` (default): the fork stops compressing (see
        :meth:`stop_compressing`), so a question and its answer are kept whole; ``True``: it keeps the budget."""
        if copies < 1:
            raise ValueError(f"copies must be a positive count, got {copies}")
        twin = copy.copy(self)
        twin.layers = [layer.fork(copies) for layer in self.layers]
        if self.layers[0].stack is not None:
            stack = LayerStack(twin.layers)
            for layer in twin.layers:
                layer.stack = stack
        if not compressing:
            twin.stop_compressing()
        return twin

    def stop_compressing(self) -> None:
        """Keep every token from now on (what the cache holds stays as compressed); the cache then grows
        like a full one."""
        for layer in self.layers:
            if layer.stack is not None:
                layer.stack.settle()
            layer.compressing = False

    def kv_bytes(self) -> int:
        """Bytes of keys and values held, all layers."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def kv_bytes_full(self) -> int:
        """Bytes a full cache would hold for the same tokens, all layers."""
        return sum(layer.kv_bytes_full() for layer in self.layers)

    def stats_bytes(self) -> int:
        """Bytes of positions and statistics kept beside the entries, all layers."""
        return sum(layer.stats_bytes() for layer in self.layers)

    def kept_tokens(self, layer_idx: int = 0) -> int:
        """Entries per head held by a layer (empty slots included)."""
        layer = self.layers[layer_idx]
        return layer.keys.shape[-2] if layer.is_initialized else 0

    def __repr__(self) -> str:
        return f"KVMergeCache(method={self.method.name!r}, layers={len(self.layers)}, seen={self.get_seq_length()})"


def _span(tensor: torch.Tensor, start: int, stop: int, dim: int | None = None) -> torch.Tensor:
    """Tokens ``start:stop`` along ``dim`` of a call's ``tensor`` (default: ``[batch, length]`` or
    ``[batch, heads, length, ...]``), without an op when that is all of them."""
    dim = (1 if tensor.dim() == 2 else 2) if dim is None else dim
    return tensor if stop - start == tensor.shape[dim] else tensor.narrow(dim, start, stop - start)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` as ``dtype``, without an op when it is already."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _new_token_validity(mask: torch.Tensor, kept: int, length: int, batch: int, device: torch.device) -> torch.Tensor:
    """Which of a call's ``length`` new tokens are real (not padding) ``[batch, length]``, read off the
    diagonal of transformers' 4D mask (a padding token is masked as a key for every query, itself included)."""
    rows = torch.arange(length, device=mask.device)
    diagonal = mask[:, 0, rows, kept + rows]
    valid = diagonal if diagonal.dtype == torch.bool else diagonal == 0
    return valid.expand(batch, length).to(device)
