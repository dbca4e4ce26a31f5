"""LESS (Dong et al. 2024): a constant-size low-rank state absorbs every evicted entry.

Per KV head the state is ``H = sum psi(k) v^T`` and ``z = sum psi(k)`` over evicted entries;
a query q then attends with ``(phi(q)^T H + sum_kept e^{s_j} v_j) / (phi(q)^T z + sum_kept e^{s_j})``.
``phi`` and ``psi`` are small learned MLPs (head_dim -> hidden -> rank) with non-negative outputs,
kept here as log-features (``phi = exp(log_phi)``) so that every sum is a stable log-sum-exp,
and the state carries its own log scale. Train the kernels with ``kvmerge train-less``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kvmerge.config import CompressionConfig
from kvmerge.method import Absorber, Eviction


class LessKernels(nn.Module):
    """The two feature maps of one layer; both return log-features ``[..., rank]``."""

    def __init__(self, head_dim: int, hidden: int = 32, rank: int = 8):
        super().__init__()
        self.query = nn.Sequential(nn.Linear(head_dim, hidden), nn.SiLU(), nn.Linear(hidden, rank))
        self.key = nn.Sequential(nn.Linear(head_dim, hidden), nn.SiLU(), nn.Linear(hidden, rank))

    def log_phi(self, queries: torch.Tensor) -> torch.Tensor:
        return self.query(queries)

    def log_psi(self, keys: torch.Tensor) -> torch.Tensor:
        return self.key(keys)


def pair_logits(log_phi: torch.Tensor, log_psi: torch.Tensor) -> torch.Tensor:
    """``log(phi(q_i)^T psi(k_j))`` for all pairs: ``[..., Lq, R]`` x ``[..., Lk, R]`` -> ``[..., Lq, Lk]``."""
    return torch.logsumexp(log_phi.unsqueeze(-2) + log_psi.unsqueeze(-3), dim=-1)


def save_kernels(kernels: nn.ModuleList, directory: Path, meta: dict) -> Path:
    """Write ``kernels.pt`` (one state dict per layer) and ``config.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save([k.state_dict() for k in kernels], directory / "kernels.pt")
    (directory / "config.json").write_text(json.dumps(meta, indent=2))
    return directory


def load_kernels(directory: str | Path) -> tuple[nn.ModuleList, dict]:
    """Read what :func:`save_kernels` wrote."""
    directory = Path(directory)
    if not (directory / "kernels.pt").exists() or not (directory / "config.json").exists():
        raise FileNotFoundError(f"no LESS kernels in {directory}: train them with `kvmerge train-less`")
    meta = json.loads((directory / "config.json").read_text())
    states = torch.load(directory / "kernels.pt", weights_only=True)
    kernels = nn.ModuleList(LessKernels(meta["head_dim"], meta["hidden"], meta["rank"]) for _ in states)
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
    description = "LESS: a learned constant-size low-rank state absorbs every evicted entry (needs kernels=DIR)"

    def __post_init__(self) -> None:
        if self.kernels is None:
            raise ValueError(
                "less needs kernels=DIR, as written by `kvmerge train-less --model M --method S --budget B`"
            )
        object.__setattr__(self, "modules", load_kernels(self.kernels)[0])

    def absorb(self, eviction: Eviction, config: CompressionConfig) -> None:
        """Add the evicted entries to the state: ``z += psi(k)``, ``H += psi(k) v^T`` (log-scaled)."""
        before, state, slots = eviction.before, eviction.state, eviction.evicted_slots
        kernels = self._kernels(before.layer_idx, before.keys.device)
        if slots is not None:  # the same count per row (decoding: one): features of those entries only
            spread = slots.unsqueeze(-1).expand(-1, -1, -1, before.keys.shape[-1])
            keys, values = before.keys.gather(2, spread), before.values.gather(2, spread)
            log_psi = kernels.log_psi(keys.float())
            if eviction.evicting is not None:  # rows that gave up an empty slot absorb nothing
                log_psi = log_psi.masked_fill(~eviction.evicting.unsqueeze(-1), float("-inf"))
        else:
            keys, values = before.keys, before.values
            log_psi = kernels.log_psi(keys.float()).masked_fill(~eviction.evicted.unsqueeze(-1), float("-inf"))
        batch, heads, _, rank = log_psi.shape
        if not state:
            state["log_scale"] = torch.full((batch, heads), float("-inf"), device=log_psi.device)
            state["z"] = torch.zeros(batch, heads, rank, device=log_psi.device)
            state["h"] = torch.zeros(batch, heads, rank, before.values.shape[-1], device=log_psi.device)
        scale = torch.maximum(state["log_scale"], log_psi.amax(dim=(-2, -1)))
        safe = torch.where(torch.isfinite(scale), scale, 0.0)
        decay = torch.exp(state["log_scale"] - safe).nan_to_num(0.0).unsqueeze(-1)  # [b, h, 1]
        weights = torch.exp(log_psi - safe.view(batch, heads, 1, 1))  # [b, h, n, r], 0 where not evicted
        state["z"] = state["z"] * decay + weights.sum(dim=2)
        absorbed = torch.einsum("bhnr,bhnd->bhrd", weights, values.float())
        state["h"] = state["h"] * decay.unsqueeze(-1) + absorbed
        state["log_scale"] = scale

    def state_attention(
        self, state: dict[str, torch.Tensor], queries: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the state adds for ``queries`` ``[b, h, g, r, d]``: ``log(phi^T z)`` ``[b, h, g, r]`` and
        ``phi^T H / phi^T z`` ``[b, h, g, r, d]``; ``None`` before anything was evicted."""
        if not state:
            return None
        log_phi = self._kernels(layer_idx, queries.device).log_phi(queries.float())  # [b, h, g, r, R]
        terms = log_phi + state["z"].log().view(*state["z"].shape[:2], 1, 1, -1)
        log_mass = state["log_scale"].view(*state["z"].shape[:2], 1, 1) + torch.logsumexp(terms, dim=-1)
        per_rank = state["h"] / state["z"].unsqueeze(-1).clamp(min=1e-30)  # [b, h, R, d]
        mean = torch.einsum("bhgqr,bhrd->bhgqd", terms.softmax(dim=-1).nan_to_num(0.0), per_rank)
        return log_mass, mean

    def _kernels(self, layer_idx: int, device: torch.device) -> LessKernels:
        if layer_idx >= len(self.modules):
            raise ValueError(f"LESS kernels in {self.kernels} cover {len(self.modules)} layers, not layer {layer_idx}")
        return self.modules[layer_idx].to(device)
