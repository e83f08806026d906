"""Second-order pruning (OBS / SparseGPT, Frantar & Alistarh 2023) and the magnitude
baseline, for unstructured, N:M and row-block patterns.

SparseGPT walks the columns in blocks like GPTQ. At the start of each block (or each
M-column group for N:M) it chooses which weights to remove by the OBS saliency
w² / [H⁻¹]_jj² (here with U the upper Cholesky factor of H⁻¹, [H⁻¹]_jj-relative terms
are U_jj²), zeroes them column by column and compensates each column's error on the
columns not yet visited: err = w_j / U_jj, W[:, j:] −= err ⊗ U[j, j:].
With H = I no compensation happens and the saliency is w², so the mask is magnitude's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sotool.algos.gptq import damped_inverse_cholesky, working_copies


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern.

    kind: 'unstructured' (a fraction of each column block), 'nm' (N zeros in every M
    consecutive weights of a row) or 'block' (groups of `size` consecutive weights in a
    row removed together).
    """

    kind: str
    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    size: int = 1

    @staticmethod
    def parse(text: str, sparsity: float) -> Pattern:
        """'unstructured', 'N:M' (e.g. '2:4') or 'blockK' (e.g. 'block4')."""
        if text == "unstructured":
            return Pattern("unstructured", sparsity)
        m = re.fullmatch(r"(\d+):(\d+)", text)
        if m:
            n, mm = int(m.group(1)), int(m.group(2))
            if not 0 < n < mm:
                raise ValueError(f"pattern {text!r}: need 0 < N < M")
            return Pattern("nm", n / mm, n=n, m=mm)
        m = re.fullmatch(r"block(\d+)", text)
        if m and int(m.group(1)) > 0:
            return Pattern("block", sparsity, size=int(m.group(1)))
        raise ValueError(f"pattern {text!r}: use 'unstructured', 'N:M' or 'blockK'")


def select_mask(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Which weights to prune (True) in a (..., R, C) slab by lowest score (each
    leading index is a separate slab).

    unstructured: exactly round(sparsity·R·C) lowest over the whole slab;
    nm: the N lowest in every M consecutive columns of each row (C divisible by M);
    block: the lowest-scoring groups of `size` consecutive columns (score summed), the
    count rounded to whole groups.
    """
    *lead, r, c = score.shape
    flat_lead = score.reshape(-1, r, c)
    b = flat_lead.shape[0]
    if pattern.kind == "unstructured":
        k = int(round(pattern.sparsity * r * c))
        mask = torch.zeros(b, r * c, dtype=torch.bool, device=score.device)
        if k > 0:
            mask.scatter_(1, torch.topk(flat_lead.reshape(b, -1), k, largest=False).indices, True)
        return mask.view(*lead, r, c)
    if pattern.kind == "nm":
        g = flat_lead.reshape(b, r, c // pattern.m, pattern.m)
        idx = torch.topk(g, pattern.n, dim=-1, largest=False).indices
        mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
        return mask.view(*lead, r, c)
    size = pattern.size
    full = c // size * size
    groups = flat_lead[..., :full].reshape(b, -1, size).sum(-1)  # (B, R·C/size)
    k = int(round(pattern.sparsity * groups.shape[1]))
    gmask = torch.zeros_like(groups, dtype=torch.bool)
    if k > 0:
        gmask.scatter_(1, torch.topk(groups, k, largest=False).indices, True)
    mask = torch.zeros(b, r, c, dtype=torch.bool, device=score.device)
    mask[..., :full] = gmask.view(b, r, -1).repeat_interleave(size, dim=-1)
    return mask.view(*lead, r, c)


def _slabs(cols: int, pattern: Pattern, block_size: int) -> int:
    """Column block width: a multiple of M (N:M) or of the group size (block)."""
    unit = pattern.m if pattern.kind == "nm" else pattern.size if pattern.kind == "block" else 1
    return max(unit, block_size // unit * unit)


def magnitude_prune(
    w: torch.Tensor, pattern: Pattern, block_size: int | None = None
) -> torch.Tensor:
    """The magnitude baseline: (R, C) mask of weights to prune (True), by |w|, selected
    per column slab of `block_size` (None = the whole layer at once)."""
    c = w.shape[1]
    if pattern.kind == "nm" and c % pattern.m:
        raise ValueError(f"{c} columns are not divisible by M={pattern.m}")
    score = w.float().pow(2)
    if block_size is None:
        return select_mask(score, pattern)
    bs = _slabs(c, pattern, block_size)
    return torch.cat([select_mask(score[:, i : i + bs], pattern) for i in range(0, c, bs)], 1)


@dataclass
class PruneResult:
    """weight (R, C) with pruned entries exactly zero; mask (R, C) True where pruned."""

    weight: torch.Tensor
    mask: torch.Tensor
    damp: float
    retries: int
    fallback: bool


def sparsegpt(
    w: torch.Tensor, h: torch.Tensor, pattern: Pattern, *, block_size: int = 128, damp: float = 0.01
) -> PruneResult:
    """Prune one layer with SparseGPT: w (R, C), h (C, C); see `sparsegpt_batch`."""
    return sparsegpt_batch(w[None], h[None], pattern, block_size=block_size, damp=damp)[0]


def sparsegpt_batch(
    w: torch.Tensor,
    h: torch.Tensor,
    pattern: Pattern,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    consume: bool = False,
) -> list[PruneResult]:
    """Prune B independent layers of one shape with SparseGPT.

    Args:
        w: (B, R, C) weights.
        h: (B, C, C) layer Hessians XXᵀ/n, undamped.
        pattern: what to remove (see Pattern); masks are chosen per layer.
        block_size: columns per mask-selection block (rounded to the pattern's unit).
        damp: relative damping λ, raised ×10 (per layer) when Cholesky fails.
        consume: w and h (float32) may be overwritten instead of copied.

    Returns:
        One PruneResult per layer.
    """
    W, H = working_copies(w, h, consume)
    nb, rows, cols = W.shape
    if pattern.kind == "nm" and cols % pattern.m:
        raise ValueError(f"{cols} columns are not divisible by M={pattern.m}")
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)
    U, lam, retries, failed = damped_inverse_cholesky(H, damp, overwrite=True)
    del H
    bs = _slabs(cols, pattern, block_size)
    mask = torch.zeros(nb, rows, cols, dtype=torch.bool, device=W.device)
    # each block transposed, (B, columns, rows): the current column and the rank-one
    # updates after it are contiguous (as in gptq_batch)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[..., i1:i2].transpose(1, 2).contiguous()  # (B, bs, R)
        Err1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        udiag = torch.diagonal(U1, dim1=-2, dim2=-1)  # (B, bs)
        d2 = udiag.pow(2)[:, None, :]  # (B, 1, bs)
        if pattern.kind != "nm":
            mask[..., i1:i2] = select_mask(W1.transpose(1, 2).pow(2) / d2, pattern)
        M1 = mask[..., i1:i2].transpose(1, 2).contiguous()  # (B, bs, R)
        for i in range(i2 - i1):
            if pattern.kind == "nm" and i % pattern.m == 0:
                sl = slice(i, i + pattern.m)
                got = select_mask(W1[:, sl].transpose(1, 2).pow(2) / d2[..., sl], pattern)
                mask[..., i1 + i : i1 + i + pattern.m] = got
                M1[:, sl] = got.transpose(1, 2)
            wc = W1[:, i]  # (B, R)
            q = wc.masked_fill(M1[:, i], 0.0)
            err = (wc - q) / udiag[:, i : i + 1]
            W1[:, i:] -= U1[:, i, i:, None] * err[:, None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[..., i1:i2] = W1.transpose(1, 2)
        W[..., i2:] -= Err1.transpose(1, 2) @ U[:, i1:i2, i2:]
    W.masked_fill_(mask, 0.0)
    return [
        PruneResult(W[b], mask[b], float(lam[b]), int(retries[b]), bool(failed[b]))
        for b in range(nb)
    ]
