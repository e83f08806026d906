"""GPTQ (Frantar et al., 2023): quantize a layer column by column, each rounding error
compensated on the not-yet-quantized columns through the inverse Hessian.

Worked 2×2 example (one output row w = [w0, w1], H⁻¹ = [[a, b], [b, c]], U its upper
Cholesky factor, U00 = √a, U01 = b/√a): column 0 rounds to q0; its error
e0 = (w0 − q0)/U00 updates w1 ← w1 − e0·U01 = w1 − (w0 − q0)·b/a, the OBS-optimal
correction; then column 1 rounds the corrected w1. With H = I, b = 0 and GPTQ is
exactly round-to-nearest.

Names follow the paper: H (in × in), Hinv's Cholesky factor U, per-block W1/Q1/Err1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sotool.algos.hessian import weighted_error
from sotool.algos.quant import QuantResult, QuantSpec, dequant_groups, fit_qparams, quantize


@dataclass
class GPTQResult(QuantResult):
    """QuantResult plus what happened during the solve.

    Attributes:
        damp: the relative damping λ that succeeded (λ·mean(diag H) added to diag H).
        retries: how many times λ was raised after a failed Cholesky factorisation.
        fallback: True when no λ worked and the layer was rounded to nearest.
        dead: number of dead input columns (H_ii = 0), zeroed.
    """

    damp: float = 0.0
    retries: int = 0
    fallback: bool = False
    dead: int = 0


def damped_inverse_cholesky(
    h: torch.Tensor, damp: float, max_retries: int = 6
) -> tuple[torch.Tensor | None, float, int]:
    """U = upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, raising λ ×10 on failure.

    Args:
        h: (d × d) symmetric PSD Hessian with no zero diagonal.
        damp: the first relative damping λ to try.
        max_retries: how many times to multiply λ by 10.

    Returns:
        (U or None when every λ failed, the λ used, the number of retries).
    """
    h64 = h.to(torch.float64)
    mean_diag = float(torch.diagonal(h64).mean())
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    lam = damp
    for attempt in range(max_retries + 1):
        hd = h64 + (lam * mean_diag) * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0 and torch.isfinite(u).all():
                return u.to(torch.float32), lam, attempt
        lam = lam * 10 if lam > 0 else 1e-4
    return None, lam, max_retries


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    keep: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize one layer with GPTQ.

    Args:
        w: (out × in) weight.
        h: (in × in) layer Hessian XXᵀ/n, undamped.
        spec: the grid (bits, group size, symmetry).
        block_size: columns per lazy-update block.
        damp: relative damping λ (retried ×10 when Cholesky fails).
        act_order: quantize columns by descending diag H.
        static_groups: fit every group's grid on the original weights before the sweep
            (with act_order, g_idx stays i // group_size). Otherwise each group's grid
            is fitted on the error-updated weights when the sweep reaches it.
        keep: optional (out × in) bool mask; False entries are pruned: they stay
            exactly zero (code = zero point) and their removal is not re-quantized.

    Returns:
        GPTQResult with dequantized weight, codes, per-group scale/zero, g_idx.
    """
    W = w.detach().to(torch.float32).clone()
    H = h.detach().to(torch.float32).clone()
    rows, cols = W.shape
    dev = W.device
    if keep is not None:
        keep = keep.to(dev, torch.bool)
        W = W * keep
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    gs = spec.group_cols(cols)
    ng = spec.groups(cols)
    grouped = spec.group_size > 0

    scale = torch.empty(rows, ng, device=dev)
    zero = torch.empty(rows, ng, device=dev)
    g_idx = torch.arange(cols, dtype=torch.int32, device=dev) // gs
    if not grouped:
        s, z = fit_qparams(W, spec)
        scale[:, 0], zero[:, 0] = s, z
    elif static_groups:
        for g in range(ng):
            s, z = fit_qparams(W[:, g * gs : (g + 1) * gs], spec)
            scale[:, g], zero[:, g] = s, z

    perm = torch.arange(cols, device=dev)
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    keep_p = keep[:, perm] if keep is not None else None

    U, lam, retries = damped_inverse_cholesky(H, damp)
    fallback = U is None
    if U is None:  # no damping made H⁻¹ factorisable: round to nearest (reported)
        U = torch.eye(cols, device=dev)

    codes = torch.zeros(rows, cols, device=dev)  # in permuted order
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grouped and not static_groups and col % gs == 0:
                # fit this group on its current, error-updated values
                end = min(col + gs, cols)
                cur = W1[:, i : min(end - i1, i2 - i1)]
                if end > i2:
                    rest = W[:, i2:end] - Err1[:, :i] @ U[i1:col, i2:end]
                    cur = torch.cat([cur, rest], dim=1)
                g = col // gs
                s, z = fit_qparams(cur, spec)
                scale[:, g], zero[:, g] = s, z
            g = int(perm[col]) // gs if (grouped and static_groups) else col // gs
            if grouped and act_order and not static_groups:
                g_idx[perm[col]] = g
            s, z = scale[:, g], zero[:, g]
            wc = W1[:, i]
            q = quantize(wc, s, z, spec.maxq)
            if keep_p is not None:
                q = torch.where(keep_p[:, col], q, z)
            codes[:, col] = q
            d = U1[i, i]
            err = (wc - s * (q - z)) / d
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes = codes[:, inv]
    weight = dequant_groups(codes, scale, zero, g_idx)
    return GPTQResult(
        weight=weight,
        codes=codes.to(torch.uint8),
        scale=scale,
        zero=zero,
        g_idx=g_idx,
        damp=lam if not fallback else math.inf,
        retries=retries,
        fallback=fallback,
        dead=int(dead.sum()),
    )


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖²/n = tr(ΔW H ΔWᵀ): the objective GPTQ minimises."""
    return weighted_error(w_hat.float() - w.float(), h)
