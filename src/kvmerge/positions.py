"""StreamingLLM's position shift for RoPE models: re-rotate cached keys to their place in the cache.

RoPE rotations compose, ``R(p + d) k = R(d) R(p) k``, so a key cached at position ``p`` moves to
``p + d`` by one more rotation, without its unrotated state. After each compression every kept
key is moved so that the kept entries sit contiguously just before the next token: the newest
query sees its cache as one unbroken sequence, whatever was evicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel


@dataclass(frozen=True)
class KeyRotation:
    """Rotates the first ``rotary_dim`` channels of keys by a position delta.

    Attributes
    ----------
    inv_freq:
        ``[rotary_dim // 2]`` RoPE inverse frequencies.
    """

    inv_freq: torch.Tensor

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> KeyRotation:
        """Read the RoPE frequencies of ``model``; error if it has no plain (default) RoPE."""
        rotaries = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
        if not rotaries:
            raise ValueError(f"position_shift needs rotary position embeddings; {type(model).__name__} has none")
        rope_type = getattr(rotaries[0], "rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"position_shift supports plain RoPE only, this model uses rope_type={rope_type!r}")
        return cls(rotaries[0].inv_freq.detach().double())  # on the model's device: no copy per compression

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Move ``keys`` ``[batch, heads, n, head_dim]`` by ``delta`` ``[batch, heads, n]`` positions."""
        angles = delta.to(torch.float64).unsqueeze(-1) * self.inv_freq.to(keys.device)  # a no-op on one device
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(keys.dtype), angles.sin().to(keys.dtype)
        rotary, rest = keys[..., : self.rotary_dim], keys[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated_half = torch.cat([-rotary[..., half:], rotary[..., :half]], dim=-1)
        return torch.cat([rotary * cos + rotated_half * sin, rest], dim=-1)
