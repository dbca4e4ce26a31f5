"""Counter-based random numbers: a draw is a hash of (seed, layer, KV head, token position).

A sequence therefore gets the same draws alone or inside any batch, and the same seed
always gives the same result, on any device, without generator state to carry around.
"""

from __future__ import annotations

import functools

import torch

_MASK32 = 0xFFFFFFFF


def _mix(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer finaliser on tensors or ints (products stay below 2**63: no int64 overflow)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def hashed_uniform(
    seed: int,
    layer_idx: int | torch.Tensor,
    heads: torch.Tensor,
    positions: torch.Tensor,
    step: torch.Tensor | None = None,
) -> torch.Tensor:
    """Uniform floats in [0, 1), one per element of the broadcast of ``heads``, ``positions`` (and ``step``,
    for draws that must change over time)."""
    return uniform_at(_mix(heads.long() ^ _layer_key(seed, layer_idx)), positions, step)


def head_keys(seed: int, layer_idx: int | torch.Tensor, heads: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[1, heads, 1]`` (``[rows, heads, 1]`` for ``layer_idx`` ``[rows, 1, 1]``): the part of
    :func:`hashed_uniform`'s hash fixed by (seed, layer, KV head), for :func:`uniform_at`; cached for
    an int layer (never modify it in place)."""
    if isinstance(layer_idx, torch.Tensor):
        return _mix(torch.arange(heads, device=device).view(1, -1, 1) ^ _layer_key(seed, layer_idx))
    return _head_keys(seed, layer_idx, heads, torch.device(device))


@functools.lru_cache(maxsize=4096)
def _head_keys(seed: int, layer_idx: int, heads: int, device: torch.device) -> torch.Tensor:
    return _mix(torch.arange(heads, device=device).view(1, -1, 1) ^ _layer_key(seed, layer_idx))


def uniform_at(keys: torch.Tensor, positions: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`hashed_uniform` from its (seed, layer, head) part ``keys`` (see :func:`head_keys`);
    ``positions`` and ``step`` are integer tensors."""
    x = _mix(keys ^ (positions & _MASK32))
    if step is not None:
        x = _mix(x ^ (step & _MASK32))
    return (x >> 8).float() * 2.0**-24  # the top 24 bits: exact in float32, always < 1


def _layer_key(seed: int, layer_idx: int | torch.Tensor) -> int | torch.Tensor:
    return _mix(_mix(seed & _MASK32) ^ (layer_idx & _MASK32))
