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
    rtn,
)


@dataclass
class GPTQResult(QuantResult):
    """QuantResult plus what happened during the solve.

    Attributes:
        damp: the relative damping λ that succeeded (λ·mean(diag H) added to diag H).
        retries: how many times λ was raised after a failed Cholesky factorisation.
        fallback: True when no λ worked and the layer was rounded to nearest.
        dead: number of dead input columns (H_ii = 0), zeroed.
        row_objective: each row's share of the layer objective tr(ΔW H ΔWᵀ) (float64),
            when the solver computed it.
        rtn_row_objective: the same for round-to-nearest on the solver's first grid.
    """

    damp: float = 0.0
    retries: int = 0
    fallback: bool = False
    dead: int = 0
    row_objective: torch.Tensor | None = None
    rtn_row_objective: torch.Tensor | None = None


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


@dataclass
class _Factored:
    """What a sweep needs besides W and the grids: the column order and H⁻¹'s factor."""

    perm: torch.Tensor  # (B, C) column order of the sweep
    u: torch.Tensor  # (B, C, C) upper factor of the damped, permuted H⁻¹
    lam: torch.Tensor
    retries: torch.Tensor
    failed: torch.Tensor
    dead: torch.Tensor  # (B, C) dead input columns


def _factor(H: torch.Tensor, damp: float, act_order: bool) -> _Factored:
    """Dead columns, act-order permutation and the inverse factor; H is consumed."""
    B, cols, _ = H.shape
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0  # (B, C)
    diag[dead] = 1.0
    perm = torch.arange(cols, device=H.device).repeat(B, 1)
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)
        for b in range(B):  # in place, one matrix at a time
            H[b] = H[b][perm[b]][:, perm[b]]
    u, lam, retries, failed = damped_inverse_cholesky(H, damp, overwrite=True)
    return _Factored(perm, u, lam, retries, failed, dead)


def _prepare(
    w: torch.Tensor,
    h: torch.Tensor,
    keep: torch.Tensor | None,
    damp: float,
    act_order: bool,
    consume: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, _Factored]:
    """W (float32, pruned entries and dead columns zeroed, column order), the keep mask
    on W's device, and H's factor (H itself is consumed)."""
    W, H = working_copies(w, h, consume)
    if keep is not None:
        keep = keep.to(W.device, torch.bool)
        W = W * keep
    fac = _factor(H, damp, act_order)
    del H
    W.masked_fill_(fac.dead[:, None, :], 0.0)
    return W, keep, fac


def _sweep(
    W: torch.Tensor,
    fac: _Factored,
    spec: QuantSpec,
    scale: torch.Tensor,
    zero: torch.Tensor,
    fixed_grid: bool,
    keep: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """The column sweep over W (B, R, C) in sweep order (overwritten); returns the codes
    in sweep order. Dynamic grids (not fixed_grid) are written into scale/zero."""
    B, rows, cols = W.shape
    dev = W.device
    U, perm = fac.u, fac.perm
    gs = spec.group_cols(cols)
    grouped = spec.group_size > 0
    codes = torch.zeros(B, rows, cols, dtype=torch.uint8, device=dev)
    # Each block is processed transposed, (B, columns, rows): the current column and
    # the rank-one updates of the columns after it are contiguous rows of memory.
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[..., i1:i2].transpose(1, 2).contiguous()  # (B, bs, R)
        Q1 = torch.empty_like(W1)  # q − z: clamp(round(w/s), −z, maxq − z)
        Err1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        dinv = 1.0 / torch.diagonal(U1, dim1=-2, dim2=-1)  # (B, bs)
        if fixed_grid:  # (B, bs, R) scale/zero of each column of this block
            gcols = perm[:, i1:i2] // gs if grouped else torch.zeros_like(perm[:, i1:i2])
            gather_idx = gcols[:, None, :].expand(-1, rows, -1)
            S1 = scale.gather(2, gather_idx).transpose(1, 2).contiguous()
            Z1 = zero.gather(2, gather_idx).transpose(1, 2).contiguous()
            LO1, HI1 = -Z1, spec.maxq - Z1
        for i in range(i2 - i1):
            col = i1 + i
            if fixed_grid:
                s, lo, hi = S1[:, i], LO1[:, i], HI1[:, i]
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
                    lo, hi = -zero[..., g], spec.maxq - zero[..., g]
                s = scale[..., g]
            wc = W1[:, i]  # (B, R)
            # the same integers as quantize(): z is an integer, so shifting the clamp
            # bounds by −z gives q − z directly
            qz = torch.div(wc, s).round_().clamp_(lo, hi)
            if keep is not None:
                qz.mul_(keep[..., col])
            Q1[:, i] = qz
            e = Err1[:, i]
            torch.addcmul(wc, s, qz, value=-1, out=e)
            e.mul_(dinv[:, i : i + 1])
            W1[:, i + 1 :].addcmul_(U1[:, i, i + 1 :, None], e[:, None, :], value=-1)
        if fixed_grid:
            Q1 += Z1
        else:  # every group of this block has its grid by now
            gb = (torch.arange(i1, i2, device=dev) // gs)[None, :, None].expand(B, -1, rows)
            Q1 += zero.transpose(1, 2).gather(1, gb)
        codes[..., i1:i2] = Q1.transpose(1, 2)
        W[..., i2:] -= Err1.transpose(1, 2) @ U[:, i1:i2, i2:]
    return codes


def _results(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    g_idx: torch.Tensor,
    fac: _Factored,
) -> list[GPTQResult]:
    """One GPTQResult per layer from codes in column order."""
    out = []
    for b in range(codes.shape[0]):
        out.append(
            GPTQResult(
                weight=dequant_groups(codes[b], scale[b], zero[b], g_idx[b]),
                codes=codes[b],
                scale=scale[b],
                zero=zero[b],
                g_idx=g_idx[b],
                damp=math.inf if bool(fac.failed[b]) else float(fac.lam[b]),
                retries=int(fac.retries[b]),
                fallback=bool(fac.failed[b]),
                dead=int(fac.dead[b].sum()),
            )
        )
    return out


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
    W, keep, fac = _prepare(w, h, keep, damp, act_order, consume)
    B, rows, cols = W.shape
    dev = W.device
    gs = spec.group_cols(cols)
    grouped = spec.group_size > 0
    fixed_grid = not grouped or static_groups  # every column's grid is known up front
    g_idx = (torch.arange(cols, device=dev) // gs).to(torch.int32).repeat(B, 1)
    if fixed_grid:
        scale, zero = fit_groups(W, spec)
    else:  # filled group by group during the sweep
        scale = torch.empty(B, rows, spec.groups(cols), device=dev)
        zero = torch.empty(B, rows, spec.groups(cols), device=dev)
    if act_order:
        W = _take_cols(W, fac.perm)
        if keep is not None:
            keep = _take_cols(keep, fac.perm)
    codes = _sweep(W, fac, spec, scale, zero, fixed_grid, keep, block_size)
    if grouped and act_order and not static_groups:  # column at position j is in group j//gs
        pos_group = (torch.arange(cols, device=dev) // gs).to(torch.int32).repeat(B, 1)
        g_idx.scatter_(1, fac.perm, pos_group)
    return _results(_take_cols(codes, torch.argsort(fac.perm, dim=-1)), scale, zero, g_idx, fac)


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


def refit_scales(
    w: torch.Tensor,
    h: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    g_idx: torch.Tensor,
    wh: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares group scales for fixed codes: each row's scales s minimise the
    layer objective (w − ŵ(s))ᵀ H (w − ŵ(s)) with ŵ_j = s_g(j)·(q_j − z_g(j)).

    The objective is quadratic in s: with d = q − z and D_g the part of d in group g,
    the normal equations are A s = b, A_gk = D_gᵀ H D_k, b_g = D_gᵀ H w (one G × G
    system per row; per channel it is s = dᵀHw / dᵀHd). Codes and zero points stay
    as they are, so the result packs into the same formats. A row keeps its old scales
    when the solution is not positive and finite or does not lower its objective, so
    the layer objective never rises.

    Args:
        w: (out × in) the original weights.
        h: (in × in) the layer Hessian XXᵀ/n (undamped).
        codes: (out × in) integer codes; scale, zero: (out × groups); g_idx: (in,).
        wh: W H when the caller already has it (it only depends on w and h).

    Returns:
        (new scale (out × groups), each row's objective with the old scales and with
        the new ones (out,), float64).
    """
    w = w.float()
    h = h.float()
    gi = g_idx.long().to(w.device)
    rows, ng = scale.shape
    d = codes.float() - zero[:, gi]
    if wh is None:
        wh = w @ h
    cols = w.shape[1]
    gs = -(-cols // ng)
    if torch.equal(gi, torch.arange(cols, device=w.device) // gs):
        a, b = _normal_equations_contiguous(d, h, wh, ng, gs)
    else:
        b = torch.zeros(rows, ng, device=w.device).index_add_(1, gi, d * wh)
        a = torch.zeros(rows, ng, ng, device=w.device)
        for g in range(ng):
            sel = (gi == g).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            dg_h = d[:, sel] @ h[sel, :]  # row i: (D_g H) restricted to row i's codes
            a[:, :, g].index_add_(1, gi, d * dg_h)
    a, b = a.double(), b.double()
    old = scale.double()
    empty = torch.diagonal(a, dim1=-2, dim2=-1) <= 0  # groups whose codes are all zero
    a_fix = a.clone()
    b_fix = b.clone()
    if empty.any():
        diag = torch.diagonal(a_fix, dim1=-2, dim2=-1)
        diag[empty] = 1.0
        b_fix[empty] = old[empty]
    new, info = torch.linalg.solve_ex(a_fix, b_fix.unsqueeze(-1))
    new = new.squeeze(-1)
    new = torch.where(empty, old, new)

    def objective_part(s: torch.Tensor) -> torch.Tensor:  # f(s) − wᵀHw
        quad = (s.unsqueeze(-2) @ a @ s.unsqueeze(-1)).reshape(rows)
        return quad - 2 * (s * b).sum(-1)

    whw = (wh * w).sum(-1, dtype=torch.float64)
    before = whw + objective_part(old)
    after = whw + objective_part(new)
    ok = (info == 0) & torch.isfinite(new).all(-1) & (new > 0).all(-1) & (after < before)
    out = torch.where(ok[:, None], new, old).to(scale.dtype)
    return out, before, torch.where(ok, after, before)


def _normal_equations_contiguous(
    d: torch.Tensor, h: torch.Tensor, wh: torch.Tensor, ng: int, gs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rows × G × G) and b (rows × G) of `refit_scales` when group g is the columns
    [g·gs, (g+1)·gs)."""
    rows, cols = d.shape
    pad = ng * gs - cols
    if pad:
        d = torch.nn.functional.pad(d, (0, pad))
        wh = torch.nn.functional.pad(wh, (0, pad))
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))
    b = (d * wh).view(rows, ng, gs).sum(-1)
    a = torch.empty(rows, ng, ng, device=d.device)
    for g in range(ng):  # A is symmetric: the blocks right of the diagonal, mirrored
        g0 = g * gs
        p = d[:, g0 : g0 + gs] @ h[g0 : g0 + gs, g0:]  # row i: (D_g H) from group g on
        a[:, g, g:] = (p.view(rows, ng - g, gs) * d[:, g0:].view(rows, ng - g, gs)).sum(-1)
        a[:, g + 1 :, g] = a[:, g, g + 1 :]
    return a, b


def row_errors(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Each output row's share of the layer objective: diag(ΔW H ΔWᵀ) (float64)."""
    dw = (w_hat.float() - w.float()).to(h.device)
    return ((dw @ h.float()) * dw).sum(-1, dtype=torch.float64)


def gptq_refit_batch(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    *,
    rounds: int = 1,
    shrink: tuple[float, ...] = (1.0,),
    consume: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    keep: torch.Tensor | None = None,
) -> list[GPTQResult]:
    """GPTQ whose grids are fitted to the solution.

    Rows are independent given H, so each row can try several grids and keep the one
    whose sweep ends lowest in the layer objective. The first sweep runs every row once
    per `shrink` factor (its fitted scales × that factor: 1 is the plain grid, < 1
    clips), all as one batch of stacked rows sharing one inverse factor; after every
    sweep each row's scales are refitted by least squares to the codes it found
    (`refit_scales`), and each further round sweeps again on the best refitted grids.
    Every row keeps the codes and scales of its best (sweep, refit), so no row's
    objective exceeds plain GPTQ's. Re-sweeps and shrink factors need grids known up
    front (per channel or static groups); with dynamic groups only one refit runs.

    Args:
        w, h, spec and the options after `consume`: as `gptq_batch`.
        rounds: 0 = plain GPTQ; k = k sweeps, each followed by a refit.
        shrink: scale factors tried by the first sweep (1.0 should be among them).
        consume: with rounds = 0, let the sweep overwrite w and h (see `gptq_batch`);
            refits need them intact, so it is ignored otherwise.
    """
    opts = dict(block_size=block_size, damp=damp, act_order=act_order, keep=keep)
    if rounds <= 0:
        return gptq_batch(w, h, spec, static_groups=static_groups, consume=consume, **opts)
    B, rows, cols = w.shape
    if spec.group_size > 0 and not static_groups:
        res = gptq_batch(w, h, spec, static_groups=False, **opts)
        for b, r in enumerate(res):
            r.scale, _, _ = refit_scales(w[b], h[b], r.codes, r.scale, r.zero, r.g_idx)
            r.weight = dequant_groups(r.codes, r.scale, r.zero, r.g_idx)
        return res
    W0, keep, fac = _prepare(w, h, keep, damp, act_order, consume=False)
    scale, zero = fit_groups(W0, spec)
    first_scale = scale.clone()
    Wp = _take_cols(W0, fac.perm)  # sweep order
    del W0
    kp = None if keep is None else _take_cols(keep, fac.perm)
    g_idx = torch.arange(cols, device=Wp.device) // spec.group_cols(cols)
    wh = [w[b].float() @ h[b].float() for b in range(B)]  # the same every round
    codes = torch.empty(B, rows, cols, dtype=torch.uint8, device=Wp.device)
    best_err = torch.full((B, rows), math.inf, dtype=torch.float64, device=Wp.device)
    for rnd in range(rounds):
        factors = shrink if rnd == 0 else (1.0,)
        k = len(factors)
        f = torch.tensor(factors, device=Wp.device).repeat_interleave(rows)[None, :, None]
        cand_scale = scale.repeat(1, k, 1) * f
        cand_zero = zero.repeat(1, k, 1)
        cand = _sweep(
            Wp.repeat(1, k, 1),
            fac,
            spec,
            cand_scale,
            cand_zero,
            True,
            None if kp is None else kp.repeat(1, k, 1),
            block_size,
        )
        cand = _take_cols(cand, torch.argsort(fac.perm, dim=-1))  # column order
        for b in range(B):
            parts = []  # one candidate at a time: the refit's work buffers stay rows × cols
            for c in range(k):
                sl = slice(c * rows, (c + 1) * rows)
                parts.append(
                    refit_scales(
                        w[b], h[b], cand[b][sl], cand_scale[b][sl], cand_zero[b][sl], g_idx, wh[b]
                    )
                )
            new_s, before, after = (torch.cat(x) for x in zip(*parts, strict=True))
            if rnd == 0 and 1.0 in factors:  # plain GPTQ's objective is the bar
                i = factors.index(1.0)
                best_err[b] = before[i * rows : (i + 1) * rows]
            err = after.view(k, rows)
            pick = err.argmin(0)  # each row's best candidate
            picked = err.gather(0, pick[None])[0]
            better = picked <= best_err[b] if rnd == 0 else picked < best_err[b]
            sel = pick * rows + torch.arange(rows, device=pick.device)
            codes[b] = torch.where(better[:, None], cand[b][sel], codes[b])
            scale[b] = torch.where(better[:, None], new_s[sel], scale[b])
            best_err[b] = torch.where(better, picked, best_err[b])
    gi = g_idx.to(torch.int32).repeat(B, 1)
    out = _results(codes, scale, zero, gi, fac)
    for b, r in enumerate(out):  # RTN on the first grid, before shrinking and refits
        grid = (first_scale[b], zero[b], gi[b])
        mask = None if keep is None else keep[b]
        r.row_objective, r.rtn_row_objective = objectives(w[b], r.weight, h[b], spec, grid, mask)
    return out


def objectives(
    w: torch.Tensor,
    w_hat: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's layer objective for the solution w_hat and for round-to-nearest, in
    one product: RTN rounds to `grid` (scale, zero, g_idx) when given, else fits its own;
    pruned entries (keep False) stay zero in it."""
    wk = w.float() if keep is None else w.float() * keep.to(w.device)
    if grid is None:
        base = rtn(wk, spec).weight
    else:
        scale, zero, g_idx = grid
        gi = g_idx.long()
        s, z = scale[:, gi], zero[:, gi]
        base = s * (quantize(wk, s, z, spec.maxq) - z)
    both = row_errors(torch.cat([w, w]), torch.cat([w_hat, base]), h)
    n = w.shape[0]
    return both[:n], both[n:]
