"""LESS (Dong et al. 2024): a constant-size low-rank state absorbs every evicted entry.

Per KV head the state is ``H = sum psi(k) v^T`` and ``z = sum psi(k)`` over evicted entries;
a query q then attends with ``(phi(q)^T H + sum_kept e^{s_j} v_j) / (phi(q)^T z + sum_kept e^{s_j})``.
``phi`` (one per query head) and ``psi`` (one per KV head, shared by its group as the official code
shares it across a multi-query model's heads) are the official two-layer feature maps with
non-negative outputs. Train the kernels with ``kvmerge train-less``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.functional import gelu

from kvmerge.config import CompressionConfig
from kvmerge.method import Absorber, Eviction

FORMAT = 2  # kernels.pt layout; 1 was a shared exp(SiLU) map per layer


def _uniform(*shape: int, fan: int) -> nn.Parameter:
    bound = math.sqrt(6 / fan)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class LessKernels(nn.Module):
    """The feature maps of one layer, as the official code builds them.

    ``phi(q) = |gelu(gelu(q W1) W2)|`` per query head; ``psi(k) = |f + (f I) * s2|`` per KV head with
    ``f = |s1| * gelu(gelu(k W1) W2)``. The scales ``s1``, ``s2`` start at 1e-4, so an untrained state
    adds almost nothing and training starts from plain eviction.
    """

    def __init__(self, head_dim: int, query_heads: int, kv_heads: int, hidden: int = 512, rank: int = 8):
        super().__init__()
        self.query_in = _uniform(query_heads, head_dim, hidden, fan=head_dim + hidden)
        self.query_out = _uniform(query_heads, hidden, rank, fan=hidden + rank)
        self.key_in = _uniform(kv_heads, head_dim, hidden, fan=head_dim + hidden)
        self.key_out = _uniform(kv_heads, hidden, rank, fan=hidden + rank)
        self.interaction = _uniform(kv_heads, rank, rank, fan=2 * rank)
        self.scale = nn.Parameter(torch.full((kv_heads, 1, rank), 1e-4))
        self.interaction_scale = nn.Parameter(torch.full((kv_heads, 1, rank), 1e-4))

    def phi(self, queries: torch.Tensor) -> torch.Tensor:
        """``[..., query_heads, L, head_dim]`` -> non-negative features ``[..., query_heads, L, rank]``."""
        hidden = gelu(torch.einsum("...hld,hde->...hle", queries, self.query_in))
        return gelu(torch.einsum("...hle,her->...hlr", hidden, self.query_out)).abs()

    def psi(self, keys: torch.Tensor) -> torch.Tensor:
        """``[..., kv_heads, L, head_dim]`` -> non-negative features ``[..., kv_heads, L, rank]``."""
        hidden = gelu(torch.einsum("...hld,hde->...hle", keys, self.key_in))
        features = self.scale.abs() * gelu(torch.einsum("...hle,her->...hlr", hidden, self.key_out))
        return (
            features + torch.einsum("...hlr,hrs->...hls", features, self.interaction) * self.interaction_scale
        ).abs()


def kernel_dir(model_name: str, selector: str, budget: int | float) -> Path:
    """Where ``kvmerge train-less`` puts the kernels of a model, selector and budget by default."""
    from kvmerge.models import cache_dir

    return cache_dir() / "less" / f"{Path(model_name).name}-{selector}-{budget}"


def find_kernels(model_name: str, selector: str, budget: int | float) -> Path:
    """The default kernel directory of a model, selector and budget; a one-line error naming the
    command that makes them when there are none."""
    directory = kernel_dir(model_name, selector, budget)
    if not (directory / "kernels.pt").exists():
        raise FileNotFoundError(
            f"no LESS kernels for {Path(model_name).name}, {selector}, budget {budget} in {directory}: make them with "
            f"`kvmerge train-less --model {model_name} --method {selector} --budget {budget}` or pass kernels=DIR"
        )
    return directory


def with_kernels(method: str, budget: int | float | None, model_name: str, options: dict) -> dict:
    """``options`` with ``kernels`` found for ``model_name`` (:func:`find_kernels`) when ``method`` is
    ``selector+less`` without them; else ``options`` as given."""
    selector, _, absorber = method.strip().lower().partition("+")
    if absorber != "less" or options.get("kernels") is not None:
        return options
    return options | {"kernels": find_kernels(model_name, selector, budget)}


def save_kernels(kernels: nn.ModuleList, directory: Path, meta: dict) -> Path:
    """Write ``kernels.pt`` (one state dict per layer) and ``config.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save([k.state_dict() for k in kernels], directory / "kernels.pt")
    (directory / "config.json").write_text(json.dumps(meta | {"format": FORMAT}, indent=2))
    return directory


def load_kernels(directory: str | Path) -> tuple[nn.ModuleList, dict]:
    """Read what :func:`save_kernels` wrote."""
    directory = Path(directory)
    if not (directory / "kernels.pt").exists() or not (directory / "config.json").exists():
        raise FileNotFoundError(f"no LESS kernels in {directory}: train them with `kvmerge train-less`")
    meta = json.loads((directory / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"LESS kernels in {directory} are of an older layout: train them again with `kvmerge train-less`"
        )
    states = torch.load(directory / "kernels.pt", weights_only=True)
    shape = (meta["head_dim"], meta["query_heads"], meta["kv_heads"], meta["hidden"], meta["rank"])
    kernels = nn.ModuleList(LessKernels(*shape) for _ in states)
    for module, state in zip(kernels, states, strict=True):
        module.load_state_dict(state)
    return kernels.eval().requires_grad_(False), meta


@dataclass(frozen=True)
class LESS(Absorber):
    """``kernels``: the directory ``kvmerge train-less`` wrote for this model and policy."""

    kernels: str | Path | None = None
    modules: nn.ModuleList = field(init=False, repr=False, compare=False)

    name = "less"
    attends = True
    layerwise = True  # per-layer kernels and state
    description = "LESS: a learned low-rank state absorbs every evicted entry (kernels from kvmerge train-less)"

    def __post_init__(self) -> None:
        if self.kernels is None:
            raise ValueError(
                "less needs kernels=DIR, as written by `kvmerge train-less --model M --method S --budget B`"
            )
        object.__setattr__(self, "modules", load_kernels(self.kernels)[0])

    def absorb(self, eviction: Eviction, config: CompressionConfig) -> None:
        """Add the evicted entries to the state: ``z += psi(k)``, ``H += psi(k) v^T``."""
        before, state, slots = eviction.before, eviction.state, eviction.evicted_slots
        kernels = self._kernels(before.layer_idx, before.keys.device)
        if slots is not None:  # the same count per row (decoding: one): features of those entries only
            spread = slots.unsqueeze(-1).expand(-1, -1, -1, before.keys.shape[-1])
            keys, values = before.keys.gather(2, spread), before.values.gather(2, spread)
            evicted = eviction.evicting  # rows that gave up an empty slot absorb nothing
        else:
            keys, values, evicted = before.keys, before.values, eviction.evicted
        psi = kernels.psi(keys.float())  # [b, h, n, R]
        if evicted is not None:
            psi = psi * evicted.unsqueeze(-1)
        if not state:
            state["z"] = torch.zeros(*psi.shape[:2], psi.shape[-1], device=psi.device)
            state["h"] = torch.zeros(*psi.shape[:2], psi.shape[-1], values.shape[-1], device=psi.device)
        state["z"] = state["z"] + psi.sum(dim=2)
        state["h"] = state["h"] + torch.einsum("bhnr,bhnd->bhrd", psi, values.float())

    def state_attention(
        self, state: dict[str, torch.Tensor], queries: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the state adds for ``queries`` ``[b, h, g, r, d]``: ``log(phi^T z)`` ``[b, h, g, r]`` and
        ``phi^T H / phi^T z`` ``[b, h, g, r, d]``; ``None`` before anything was evicted."""
        if not state:
            return None
        batch, heads, group, rows, dim = queries.shape
        phi = self._kernels(layer_idx, queries.device).phi(queries.float().reshape(batch, heads * group, rows, dim))
        phi = phi.view(batch, heads, group, rows, -1)
        mass = torch.einsum("bhgqr,bhr->bhgq", phi, state["z"])
        mean = torch.einsum("bhgqr,bhrd->bhgqd", phi, state["h"]) / mass.unsqueeze(-1).clamp(min=1e-30)
        return mass.log(), mean

    def _kernels(self, layer_idx: int, device: torch.device) -> LessKernels:
        if layer_idx >= len(self.modules):
            raise ValueError(f"LESS kernels in {self.kernels} cover {len(self.modules)} layers, not layer {layer_idx}")
        return self.modules[layer_idx].to(device)
