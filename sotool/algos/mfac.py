"""Inverse empirical-Fisher products without forming the matrix.

M-FAC (Frantar, Kurtic & Alistarh, 2021), static algorithm: for
F = λI + (1/m) Σᵢ gᵢgᵢᵀ (d × d, m gradients), Sherman–Morrison applied m times gives
F⁻¹ = I/λ − Σₖ cₖ vₖvₖᵀ with vₖ = F₍ₖ₋₁₎⁻¹gₖ and cₖ = 1/(m + gₖᵀvₖ).
Building V (m × d) costs O(d·m²); each product F⁻¹x then costs O(d·m), and the
diagonal of F⁻¹ (for OBS saliencies) O(d·m).

`BlockFisherInverse` is oBERT's block-diagonal variant: F restricted to blocks of B
consecutive weights, each block's inverse kept explicitly (memory O(d·B)) and updated
by one rank-one Sherman–Morrison step per gradient.
"""

from __future__ import annotations

import torch


class StaticMFAC:
    """F⁻¹ products for F = λI + (1/m) Σ gᵢgᵢᵀ.

    Args:
        grads: (m, d) gradients (float32 or float64).
        damp: λ > 0.
    """

    def __init__(self, grads: torch.Tensor, damp: float) -> None:
        if damp <= 0:
            raise ValueError("damp must be > 0")
        g = grads.to(torch.float64)
        m, d = g.shape
        self.damp = damp
        self.m = m
        v = torch.empty(m, d, dtype=torch.float64, device=g.device)
        c = torch.empty(m, dtype=torch.float64, device=g.device)
        for k in range(m):
            # v_k = F_{k-1}^{-1} g_k = g_k/λ − Σ_{j<k} c_j (v_j·g_k) v_j
            vk = g[k] / damp
            if k:
                vk = vk - (c[:k] * (v[:k] @ g[k])) @ v[:k]
            v[k] = vk
            c[k] = 1.0 / (m + g[k] @ vk)
        self.v, self.c = v, c

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """F⁻¹x for x (d,) or (d, k)."""
        x64 = x.to(torch.float64)
        coef = self.v @ x64  # (m,) or (m, k)
        coef = coef * (self.c if x64.dim() == 1 else self.c[:, None])
        return (x64 / self.damp - self.v.T @ coef).to(x.dtype)

    def diag(self) -> torch.Tensor:
        """diag(F⁻¹) (d,)."""
        return 1.0 / self.damp - (self.c[:, None] * self.v.pow(2)).sum(0)


class BlockFisherInverse:
    """Block-diagonal F⁻¹ with blocks of `block` consecutive weights.

    Args:
        d: number of weights (padded up to a multiple of `block`).
        block: B.
        damp: λ > 0; F⁻¹ starts at I/λ.
        m: the number of gradients the Fisher averages over (the 1/m factor).
    """

    def __init__(
        self, d: int, block: int, damp: float, m: int, device: torch.device | str = "cpu"
    ) -> None:
        self.d, self.block, self.m = d, block, m
        nb = -(-d // block)
        eye = torch.eye(block, device=device) / damp
        self.inv = eye.repeat(nb, 1, 1)  # (nb, B, B)

    def _blocks(self, g: torch.Tensor) -> torch.Tensor:
        pad = self.inv.shape[0] * self.block - self.d
        g = torch.nn.functional.pad(g.float(), (0, pad))
        return g.view(-1, self.block)

    def update(self, g: torch.Tensor) -> None:
        """Add one gradient g (d,): F ← F + ggᵀ/m, by Sherman–Morrison per block."""
        gb = self._blocks(g)  # (nb, B)
        u = torch.bmm(self.inv, gb[:, :, None])[:, :, 0]  # F⁻¹g per block
        denom = self.m + (gb * u).sum(-1)  # (nb,)
        self.inv -= u[:, :, None] * u[:, None, :] / denom[:, None, None]

    def dense(self) -> torch.Tensor:
        """The full (d × d) inverse (for tests on small d)."""
        full = torch.block_diag(*self.inv)
        return full[: self.d, : self.d]

    def diag(self) -> torch.Tensor:
        return torch.diagonal(self.inv, dim1=-2, dim2=-1).reshape(-1)[: self.d]
