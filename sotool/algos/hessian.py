"""The one layer-wise Hessian accumulator.

For a Linear layer with inputs x (n tokens × d_in), the reconstruction objective
‖WX − ŴX‖²/n has Hessian H = XXᵀ/n (the paper's 2XXᵀ/n up to the factor 2, which
no consumer depends on: GPTQ and OBS are invariant to scaling H and damping is
relative to its mean diagonal). We accumulate the raw sum Σxxᵀ in float32 and the
token count, and normalise only when reading.
"""

from __future__ import annotations

import math

import torch


class HessianSum:
    """Running Σxxᵀ (d × d, float32) and token count n for one layer input.

    Only the upper triangle is accumulated, in row bands of `TILE` (matrix products
    of a band against the columns right of it: about 30% fewer flops than the full
    product at these sizes); `sum` mirrors it into a full symmetric matrix on demand.
    """

    TILE = 192

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self._sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self._mirrored = True
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs x (..., d): every leading index is one token."""
        x2 = x.reshape(-1, x.shape[-1]).to(self._sum.device, torch.float32)
        d = x2.shape[1]
        bands = max(1, math.ceil(d / self.TILE))
        if bands == 1:
            self._sum.addmm_(x2.t(), x2)
        else:
            if self._mirrored:  # restart from the upper triangle
                self._sum.triu_()
            width = math.ceil(d / bands)
            xt = x2.t()
            for i in range(0, d, width):
                self._sum[i : i + width, i:].addmm_(xt[i : i + width], x2[:, i:])
            self._mirrored = False
        self.count += x2.shape[0]

    @property
    def sum(self) -> torch.Tensor:
        """Σxxᵀ (d × d), symmetric."""
        if not self._mirrored:
            upper = self._sum.triu(1)
            self._sum.triu_().add_(upper.t())
            self._mirrored = True
        return self._sum

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
