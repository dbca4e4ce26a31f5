"""Compressing the decoding steps of all of a cache's layers at once (see :class:`LayerStack`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvmerge.cache import KVMergeLayer


class LayerStack:
    """Compresses the decoding steps of a cache's layers together.

    A decoding step that evicts one entry per row in place runs the same few dozen small ops in every
    layer, and on a CPU such ops cost their launch, not their size. So each layer leaves that step's
    compression here (``pending``), and after the last layer's attention the stack compresses them
    all as one layer whose batch is every layer's rows: the layers' per-entry buffers are slices of
    one buffer ``[layers * batch, kv_heads, n, ...]`` (layer-major), and the method sees ``layer_idx``
    per row, ``[layers * batch, 1, 1]``. A layer's compression reads and writes only its own rows,
    and nothing reads a layer's cache between its attention and its next one, so this is exactly
    compressing each layer after its attention. The buffers are stacked (copied) once, when decoding
    first reaches the budget, and stay stacked while every layer evicts in place.
    """

    def __init__(self, layers: list[KVMergeLayer]):
        self.layers = layers
        self.pending: list[KVMergeLayer] = []
        self._stacked: KVMergeLayer | None = None  # the layers as one
        self._full: dict[str, torch.Tensor] = {}  # the stacked buffers by name, each full (one over budget)
        # per layer: its slices of the buffers, and the first n - 1 entries of each (held after an eviction)
        self._slices: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def attended(self, layer: KVMergeLayer, deferred: bool) -> None:
        """``layer`` finished its attention call, leaving its compression to the stack or not: after
        the last layer, compress the deferred ones. A layer that compressed alone may have left the
        stacked buffers, so they are let go (not held beside the layers' new ones)."""
        if not deferred:
            self.unstack()
        if layer is self.layers[-1]:
            self.settle()

    def unstack(self) -> None:
        """Let go of the stacked buffers (the layers keep what they hold); stacked anew when needed."""
        self._stacked, self._full, self._slices = None, {}, []

    def settle(self) -> None:
        """Compress every layer that deferred: together when all did, else one by one."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        if not self._is_stacked():
            self.unstack()
        if len(pending) == len(self.layers) and (self._stacked is not None or self._stack()):
            self._compress_stacked()
        else:
            for layer in pending:
                layer.compress()

    def _is_stacked(self) -> bool:
        """Whether every layer still holds, full, its slices of the stacked buffers."""
        if self._stacked is None:
            return False
        n = self._full["index"].shape[2]
        return all(
            layer.index.shape[-1] == n and all(layer._buffers.get(name) is part for name, part in full.items())
            for layer, (full, _) in zip(self.layers, self._slices, strict=True)
        )

    def _stack(self) -> bool:
        """Copy the layers' per-entry tensors into stacked buffers; ``False`` when their shapes, dtypes or
        devices (``device_map``) differ."""
        first = self.layers[0]
        named = [layer._named(layer.entries) for layer in self.layers]
        same = all(
            layer.budget_max == first.budget_max
            and layer.device == first.device
            and all(t.shape == named[0][k].shape and t.dtype == named[0][k].dtype for k, t in held.items())
            for layer, held in zip(self.layers, named, strict=True)
        )
        if not same:
            return False
        self._full = {name: torch.cat([held[name] for held in named]) for name in named[0]}
        batch, n = first.index.shape[0], first.index.shape[-1]
        layer_ids = torch.tensor([layer.layer_idx for layer in self.layers], device=first.device)
        stacked = type(first)(first.method, layer_ids.repeat_interleave(batch).view(-1, 1, 1))
        stacked.lazy_initialization(self._full["keys"], self._full["values"])
        stacked.budgets = torch.cat([layer.budgets for layer in self.layers])
        stacked.recent = torch.cat([layer.recent for layer in self.layers])
        stacked.budget_max, stacked.budget_min, stacked.sink = first.budget_max, first.budget_min, first.sink
        stacked.compressions = 1
        stacked._buffers = dict(self._full)
        self._stacked, self._slices = stacked, []
        for i, layer in enumerate(self.layers):
            full = {name: buffer.narrow(0, i * batch, batch) for name, buffer in self._full.items()}
            self._slices.append((full, {name: part.narrow(2, 0, n - 1) for name, part in full.items()}))
            layer._buffers = dict(full)
            layer._hold(full)
        return True

    def _compress_stacked(self) -> None:
        """One in-place eviction for every layer's rows, then each layer holds its kept slices."""
        stacked = self._stacked
        stacked.valid_seen = torch.cat([layer.valid_seen for layer in self.layers])
        stacked._value_sums = {
            name: torch.cat([layer._value_sums[name] for layer in self.layers]) for name in stacked._sum_names
        }
        stacked._hold(self._full)
        stacked.compress()
        for layer, (_, held) in zip(self.layers, self._slices, strict=True):
            layer._hold(held)
            layer.ordered = False
            layer.compressions += 1
            layer.since_compression = 0
