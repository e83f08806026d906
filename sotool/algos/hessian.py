"""The one layer-wise Hessian accumulator.

For a Linear layer with inputs x (n tokens × d_in), the reconstruction objective
‖WX − ŴX‖²/n has Hessian H = XXᵀ/n (the paper's 2XXᵀ/n up to the factor 2, which
no consumer depends on: GPTQ and OBS are invariant to scaling H and damping is
relative to its mean diagonal). We accumulate the raw sum Σxxᵀ in float32 and the
token count, and normalise only when reading.
"""

from __future__ import annotations

import torch


class HessianSum:
    """Running Σxxᵀ (d × d, float32) and token count n for one layer input."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs x (..., d): every leading index is one token."""
        x2 = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        self.sum.addmm_(x2.t(), x2)
        self.count += x2.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = Σxxᵀ / n (d × d)."""
        return normalize(self.sum, self.count)


def normalize(sum_xxt: torch.Tensor, count: int) -> torch.Tensor:
    """H = Σxxᵀ / n; an all-zero matrix when no tokens were seen."""
    return sum_xxt / max(count, 1)


def weighted_error(delta_w: torch.Tensor, h: torch.Tensor) -> float:
    """The layer objective ‖ΔW X‖²/n = tr(ΔW H ΔWᵀ) for ΔW (out × in), H (in × in)."""
    dw = delta_w.float()
    return float(((dw @ h.float()) * dw).sum(dtype=torch.float64))
