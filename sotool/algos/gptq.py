"""GPTQ (Frantar et al., 2023): quantize a layer column by column, each rounding error
compensated on the not-yet-quantized columns through the inverse Hessian.

Worked 2×2 example (one output row w = [w0, w1], H⁻¹ = [[a, b], [b, c]], U its upper
Cholesky factor, U00 = √a, U01 = b/√a): column 0 rounds to q0; its error
e0 = (w0 − q0)/U00 updates w1 ← w1 − e0·U01 = w1 − (w0 − q0)·b/a, the OBS-optimal
correction; then column 1 rounds the corrected w1. With H = I, b = 0 and GPTQ is
exactly round-to-nearest.

Names follow the paper: H (in × in), Hinv's Cholesky factor U, per-block W1/Err1.
`gptq_batch` solves B independent layers of one shape at once (a leading batch dim on
every tensor), which removes most of the per-column Python overhead when many layers
are solved from cached Hessians; `gptq` is the single-layer form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sotool.algos.hessian import weighted_error
from sotool.algos.quant import (
    QuantResult,
    QuantSpec,
    dequant_groups,
    fit_groups,
    fit_qparams,
    quantize,
)


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
    h: torch.Tensor, damp: float, max_retries: int = 6, *, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """U = upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ for each H in a batch,
    raising λ ×10 for the matrices whose factorisation fails.

    Args:
        h: (B, d, d) symmetric PSD Hessians with no zero diagonal.
        damp: the first relative damping λ to try.
        max_retries: how many times λ may be multiplied by 10.
        overwrite: write U into h's storage (h is consumed; saves a B·d² buffer).

    Returns:
        U (B, d, d) float32 (identity where every λ failed), λ used (B,), retries (B,),
        failed (B,) bool.
    """
    b, d, _ = h.shape
    out = h if overwrite and h.dtype == torch.float32 else torch.empty(b, d, d, device=h.device)
    lams = torch.empty(b, dtype=torch.float64)
    retries = torch.zeros(b, dtype=torch.int64)
    failed = torch.zeros(b, dtype=torch.bool)
    for k in range(b):  # one matrix at a time: work memory stays O(d²)
        hk = h[k].to(torch.float32, copy=True)
        mean_diag = float(torch.diagonal(hk).double().mean())
        lam = float(damp)
        for attempt in range(max_retries + 1):
            u = _inverse_factor(hk, lam * mean_diag, torch.float32)
            if u is None:  # float32 lost definiteness: ask float64 before raising λ
                u = _inverse_factor(hk, lam * mean_diag, torch.float64)
            if u is not None:
                out[k] = u
                break
            if attempt == max_retries:
                out[k] = torch.eye(d, device=h.device)
                failed[k] = True
                break
            lam = lam * 10 if lam > 0 else 1e-4
            retries[k] += 1
        lams[k] = lam
    return out, lams, retries, failed


def _inverse_factor(h: torch.Tensor, shift: float, dtype: torch.dtype) -> torch.Tensor | None:
    """Upper U with (H + shift·I)⁻¹ = UᵀU, in float32; None when H + shift·I is not
    numerically positive definite in `dtype`.

    H + shift·I = V Vᵀ with V upper triangular (the Cholesky factor with rows and
    columns reversed), so (H + shift·I)⁻¹ = V⁻ᵀV⁻¹ = UᵀU with U = V⁻¹ upper: the factor
    GPTQ needs, without forming the inverse.
    """
    a = h.to(dtype, copy=True)
    a.diagonal().add_(shift)
    chol, info = torch.linalg.cholesky_ex(a.flip(0, 1))
    if int(info) != 0:
        return None
    eye = torch.eye(h.shape[0], dtype=dtype, device=h.device)
    u = torch.linalg.solve_triangular(chol.flip(0, 1), eye, upper=True)
    if not bool(torch.isfinite(u).all()):
        return None
    return u.to(torch.float32)


def working_copies(
    w: torch.Tensor, h: torch.Tensor, consume: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 W and H a column sweep may overwrite: the inputs themselves when the
    caller hands them over (`consume`), else copies."""
    W = w.detach().to(torch.float32)
    H = h.detach().to(torch.float32)
    if not consume and W.data_ptr() == w.data_ptr():
        W = W.clone()
    if not consume and H.data_ptr() == h.data_ptr():
        H = H.clone()
    return W, H


def _take_cols(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, R, C) with columns reordered per batch by idx (B, C)."""
    return x.gather(2, idx[:, None, :].expand(-1, x.shape[1], -1))


def gptq_batch(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    keep: torch.Tensor | None = None,
    consume: bool = False,
) -> list[GPTQResult]:
    """GPTQ for B independent layers of the same shape.

    Args:
        w: (B, out, in) weights.
        h: (B, in, in) layer Hessians XXᵀ/n, undamped.
        spec: the grid (bits, group size, symmetry).
        block_size: columns per lazy-update block.
        damp: relative damping λ (raised ×10 per layer when Cholesky fails).
        act_order: quantize columns by descending diag H.
        static_groups: fit every group's grid on the original weights before the sweep
            (with act_order, g_idx stays i // group_size). Otherwise each group's grid
            is fitted on the error-updated weights when the sweep reaches it.
        keep: optional (B, out, in) bool mask; False entries are pruned: they stay
            exactly zero (code = zero point) and their error is compensated.
        consume: w and h (float32) are scratch space the solve may overwrite, instead
            of being copied (large batches then need about half the memory).

    Returns:
        One GPTQResult per layer.
    """
    W, H = working_copies(w, h, consume)
    B, rows, cols = W.shape
    dev = W.device
    if keep is not None:
        keep = keep.to(dev, torch.bool)
        W = W * keep
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0  # (B, C)
    diag[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)
    gs = spec.group_cols(cols)
    ng = spec.groups(cols)
    grouped = spec.group_size > 0

    g_idx = (torch.arange(cols, device=dev) // gs).to(torch.int32).repeat(B, 1)
    if not grouped or static_groups:
        scale, zero = fit_groups(W, spec)
    else:  # filled group by group during the sweep
        scale = torch.empty(B, rows, ng, device=dev)
        zero = torch.empty(B, rows, ng, device=dev)

    perm = torch.arange(cols, device=dev).repeat(B, 1)
    if act_order:
        perm = torch.argsort(
            torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True
        )
        W = _take_cols(W, perm)
        for b in range(B):  # in place, one matrix at a time
            H[b] = H[b][perm[b]][:, perm[b]]
        if keep is not None:
            keep = _take_cols(keep, perm)

    U, lam, retries, failed = damped_inverse_cholesky(H, damp, overwrite=True)
    del H

    codes = torch.zeros(B, rows, cols, dtype=torch.uint8, device=dev)  # permuted order
    fixed_grid = not grouped or static_groups  # every column's grid is known up front
    # Each block is processed transposed, (B, columns, rows): the current column and
    # the rank-one updates of the columns after it are contiguous rows of memory.
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[..., i1:i2].transpose(1, 2).contiguous()  # (B, bs, R)
        Q1 = torch.empty_like(W1)
        Err1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        dinv = 1.0 / torch.diagonal(U1, dim1=-2, dim2=-1)  # (B, bs)
        if fixed_grid:  # (B, bs, R) scale/zero of each column of this block
            gcols = perm[:, i1:i2] // gs if grouped else torch.zeros_like(perm[:, i1:i2])
            gather_idx = gcols[:, None, :].expand(-1, rows, -1)
            S1 = scale.gather(2, gather_idx).transpose(1, 2).contiguous()
            Z1 = zero.gather(2, gather_idx).transpose(1, 2).contiguous()
        for i in range(i2 - i1):
            col = i1 + i
            if fixed_grid:
                s, z = S1[:, i], Z1[:, i]
            else:
                g = col // gs
                if col % gs == 0:
                    # fit this group on its current, error-updated values
                    end = min(col + gs, cols)
                    cur = W1[:, i : min(end - i1, i2 - i1)].transpose(1, 2)
                    if end > i2:
                        rest = W[..., i2:end] - Err1[:, :i].transpose(1, 2) @ U[:, i1:col, i2:end]
                        cur = torch.cat([cur, rest], dim=-1)
                    fs, fz = fit_qparams(cur, spec)
                    scale[..., g], zero[..., g] = fs, fz
                s, z = scale[..., g], zero[..., g]
            wc = W1[:, i]  # (B, R)
            q = quantize(wc, s, z, spec.maxq)
            if keep is not None:
                q = torch.where(keep[..., col], q, z)
            Q1[:, i] = q
            err = (wc - s * (q - z)) * dinv[:, i : i + 1]
            W1[:, i:] -= U1[:, i, i:, None] * err[:, None, :]
            Err1[:, i] = err
        codes[..., i1:i2] = Q1.transpose(1, 2)
        W[..., i2:] -= Err1.transpose(1, 2) @ U[:, i1:i2, i2:]

    if grouped and act_order and not static_groups:  # column at position j is in group j//gs
        pos_group = (torch.arange(cols, device=dev) // gs).to(torch.int32).repeat(B, 1)
        g_idx.scatter_(1, perm, pos_group)
    codes = _take_cols(codes, torch.argsort(perm, dim=-1))
    out = []
    for b in range(B):
        weight = dequant_groups(codes[b], scale[b], zero[b], g_idx[b])
        out.append(
            GPTQResult(
                weight=weight,
                codes=codes[b],
                scale=scale[b],
                zero=zero[b],
                g_idx=g_idx[b],
                damp=math.inf if bool(failed[b]) else float(lam[b]),
                retries=int(retries[b]),
                fallback=bool(failed[b]),
                dead=int(dead[b].sum()),
            )
        )
    return out


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
    """Quantize one layer with GPTQ: w (out × in), h (in × in); see `gptq_batch`."""
    return gptq_batch(
        w[None],
        h[None],
        spec,
        block_size=block_size,
        damp=damp,
        act_order=act_order,
        static_groups=static_groups,
        keep=None if keep is None else keep[None],
    )[0]


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖²/n = tr(ΔW H ΔWᵀ): the objective GPTQ minimises."""
    return weighted_error(w_hat.float() - w.float(), h)
