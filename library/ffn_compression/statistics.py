"""Running first and second moments of an FFN's hidden activation: all that both initialisations need.

The hidden activation ``h`` is the GEGLU output, the input of ``ff.net.2``. Its mean and covariance
are sufficient for PCA, for activation-weighted importance, and for the least-squares refit of
``ff.net.2`` (whose target ``W2 h + b2`` is linear in ``h``). Sums are kept in float64; each call
adds one ``hᵀh`` product in float32 (float64 for float64 inputs), computed where ``h`` lives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HiddenStats:
    """Token count, sum and sum of outer products of one FFN's hidden activation."""

    count: int
    total: torch.Tensor  # (n,) float64
    outer: torch.Tensor  # (n, n) float64

    @classmethod
    def empty(cls, width: int, device: torch.device | str = "cpu") -> HiddenStats:
        zeros = torch.zeros(width, dtype=torch.float64, device=device)
        return cls(0, zeros, torch.zeros(width, width, dtype=torch.float64, device=device))

    @property
    def width(self) -> int:
        return self.total.numel()

    def add(self, hidden: torch.Tensor) -> None:
        """Add every token of ``hidden`` (..., n)."""
        rows = hidden.detach().reshape(-1, self.width)
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        self.count += rows.shape[0]
        self.total += rows.sum(0).to(self.total)
        self.outer += (rows.T @ rows).to(self.outer)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """The (biased) covariance ``E[h hᵀ] - μ μᵀ``, symmetrised."""
        mean = self.mean
        covariance = self.outer / max(self.count, 1) - torch.outer(mean, mean)
        return (covariance + covariance.T) / 2

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {
            f"{prefix}count": torch.tensor(self.count, dtype=torch.int64),
            f"{prefix}total": self.total.cpu(),
            f"{prefix}outer": self.outer.cpu(),
        }

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> HiddenStats:
        return cls(int(tensors[f"{prefix}count"]), tensors[f"{prefix}total"], tensors[f"{prefix}outer"])
