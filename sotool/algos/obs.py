"""OBS with a block-diagonal empirical Fisher (oBERT, Kurtic et al. 2022) and the
allocation of a sparsity budget across layers by saliency.

A layer's weight W (R × C) is flattened row-major to w (d = R·C) and cut into blocks of
B consecutive weights (padded with zeros to a multiple of B). Within each block the
loss is modelled by F = λI + (1/m) Σᵢ gᵢgᵢᵀ over m per-sample gradients, and F⁻¹ is
built by one Sherman–Morrison step per gradient (`BlockFisherInverse`), memory O(d·B).

Removing a set Q of weights of one block costs ½ w_Qᵀ([F⁻¹]_QQ)⁻¹ w_Q and the optimal
change of the block is δw = −F⁻¹ e_Q ([F⁻¹]_QQ)⁻¹ w_Q (zero on Q exactly). For a single
weight the cost is w_j² / (2[F⁻¹]_jj). Weights are chosen by their single (or, for
`blockK` patterns, their group's) saliency, then each Fisher block is updated jointly
for every weight chosen in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sotool.algos.mfac import BlockFisherInverse, StaticMFAC
from sotool.algos.prune import Pattern, select_mask


def fisher_damp(grads: torch.Tensor, damp: float) -> float:
    """Absolute λ = damp · mean diagonal of (1/m) Σ ggᵀ (grads (m, d)); `damp` when the
    gradients are all zero."""
    mean_diag = float(grads.float().pow(2).mean())
    return damp * mean_diag if mean_diag > 0 else max(damp, 1e-12)


def block_fisher_inverse(grads: torch.Tensor, block: int, lam: float) -> torch.Tensor:
    """(nb, B, B) inverses of the diagonal blocks of λI + (1/m) Σ gᵢgᵢᵀ.

    Args:
        grads: (m, d) per-sample gradients of the flattened weight.
        block: B.
        lam: absolute damping λ > 0.
    """
    m, d = grads.shape
    inv = BlockFisherInverse(d, block, lam, m, device=grads.device)
    for g in grads:
        inv.update(g)
    return inv.inv


def to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """Flatten (…) row-major and cut into (nb, B), zero-padded."""
    flat = w.reshape(-1).float()
    pad = -flat.numel() % block
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block)


def from_blocks(wb: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `to_blocks`."""
    n = 1
    for s in shape:
        n *= s
    return wb.reshape(-1)[:n].view(shape)


def weight_saliency(wb: torch.Tensor, finv: torch.Tensor) -> torch.Tensor:
    """(nb, B) single-weight OBS costs w_j² / (2[F⁻¹]_jj) for wb (nb, B), finv (nb, B, B)."""
    return wb.pow(2) / (2 * torch.diagonal(finv, dim1=-2, dim2=-1))


def group_saliency(wb: torch.Tensor, finv: torch.Tensor, size: int) -> torch.Tensor:
    """(nb, B/K) costs ½ w_Gᵀ([F⁻¹]_GG)⁻¹ w_G of removing each group G of K = `size`
    consecutive weights (B must be a multiple of K)."""
    nb, b = wb.shape
    k = b // size
    # the K×K diagonal sub-blocks of every block: (nb, k, K, K)
    sub = torch.stack(
        [finv[:, i * size : (i + 1) * size, i * size : (i + 1) * size] for i in range(k)], 1
    )
    wg = wb.view(nb, k, size, 1).double()
    x = torch.linalg.solve(sub.double(), wg)
    return (0.5 * (wg * x).sum((-2, -1))).float()


def obs_update(wb: torch.Tensor, finv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Remove the masked weights of every block with the closed-form OBS update.

    Args:
        wb: (nb, B) weights.
        finv: (nb, B, B) block inverses F⁻¹.
        mask: (nb, B) True where removed (any number per block).

    Returns:
        (nb, B) w + δw with δw = −F⁻¹ e_Q ([F⁻¹]_QQ)⁻¹ w_Q per block; exactly zero on Q.
    """
    q = mask.to(finv.dtype)
    # [F⁻¹]_QQ embedded in an identity: solving it gives ([F⁻¹]_QQ)⁻¹ w_Q on Q, 0 elsewhere
    a = finv.double() * (q[:, :, None] * q[:, None, :]).double()
    a = a + torch.diag_embed((1 - q).double())
    x = torch.linalg.solve(a, (wb * q).double()[:, :, None])
    out = (wb.double() - (finv.double() @ x)[:, :, 0]).float()
    return out.masked_fill(mask, 0.0)


def fisher_loss(delta: torch.Tensor, grads: torch.Tensor, lam: float, block: int) -> float:
    """½ δwᵀ F δw under the block-diagonal Fisher, for δw (R, C), grads (m, R·C)."""
    db = to_blocks(delta, block).double()  # (nb, B)
    gb = torch.stack([to_blocks(g, block) for g in grads]).double()  # (m, nb, B)
    proj = (gb * db[None]).sum(-1)  # (m, nb): gᵢ_b · δw_b
    return float(0.5 * (lam * db.pow(2).sum() + proj.pow(2).sum() / grads.shape[0]))


@dataclass
class OBSResult:
    """weight (R, C) with pruned entries exactly zero; mask (R, C) True where pruned;
    lam: the absolute damping used."""

    weight: torch.Tensor
    mask: torch.Tensor
    lam: float


def check_layout(shape: tuple[int, int], pattern: Pattern, block: int) -> None:
    """Raise ValueError when the pattern's groups do not fit the rows or Fisher blocks."""
    cols = shape[1]
    if pattern.kind == "nm" and cols % pattern.m:
        raise ValueError(f"{cols} columns are not divisible by M={pattern.m}")
    if pattern.kind == "block" and (cols % pattern.size or block % pattern.size):
        raise ValueError(
            f"block{pattern.size}: the row length {cols} and the Fisher block {block} "
            f"must be multiples of {pattern.size}"
        )


def obert_saliency(
    w: torch.Tensor, finv: torch.Tensor, pattern: Pattern, block: int
) -> torch.Tensor:
    """(R, C) per-weight saliency; for `blockK` every weight carries 1/K of its group's
    cost (so a group's summed score is its joint OBS cost)."""
    wb = to_blocks(w, block)
    if pattern.kind == "block":
        gs = group_saliency(wb, finv, pattern.size) / pattern.size
        s = gs.repeat_interleave(pattern.size, dim=1)
    else:
        s = weight_saliency(wb, finv)
    return from_blocks(s, tuple(w.shape))


def obert_prune(
    w: torch.Tensor,
    grads: torch.Tensor,
    pattern: Pattern,
    *,
    block: int = 32,
    damp: float = 0.01,
) -> OBSResult:
    """Prune one layer in one shot with the block-diagonal Fisher.

    Args:
        w: (R, C) weight.
        grads: (m, R·C) per-sample gradients of the loss w.r.t. w (row-major).
        pattern: unstructured (over the whole layer), N:M or blockK.
        block: Fisher block size B (a multiple of K for blockK).
        damp: relative damping (λ = damp · mean diag of the empirical Fisher).
    """
    check_layout(tuple(w.shape), pattern, block)
    lam = fisher_damp(grads, damp)
    finv = block_fisher_inverse(grads.float(), block, lam)
    score = obert_saliency(w, finv, pattern, block)
    mask = select_mask(score, pattern)
    new = obs_update(to_blocks(w, block), finv, to_blocks(mask, block).bool())
    return OBSResult(from_blocks(new, tuple(w.shape)), mask, lam)


def mfac_saliency(w: torch.Tensor, grads: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """(R, C) OBS saliencies w² / (2[F⁻¹]_jj) with the full (not block-diagonal) empirical
    Fisher of the layer, its inverse diagonal from M-FAC (O(d·m²), never forming F)."""
    lam = fisher_damp(grads, damp)
    diag = StaticMFAC(grads, lam).diag().float()
    return (w.float().reshape(-1).pow(2) / (2 * diag)).view(w.shape)


def allocate_sparsity(
    scores: dict[str, torch.Tensor], target: float, max_sparsity: float = 0.95
) -> dict[str, float]:
    """Spread a pruning budget over layers by one global saliency threshold.

    Args:
        scores: per layer, the saliencies of its removable units (weights or groups), any
            shape; units of every layer count the same.
        target: fraction of all units to remove.
        max_sparsity: no layer loses more than this fraction.

    Returns:
        Per-layer fraction removed; Σ fractionᵢ·nᵢ = round(target·Σnᵢ) up to ties.
    """
    sorted_ = {k: torch.sort(v.reshape(-1).float()).values for k, v in scores.items()}
    sizes = {k: v.numel() for k, v in sorted_.items()}
    want = round(target * sum(sizes.values()))
    caps = {k: int(max_sparsity * n) for k, n in sizes.items()}
    if want > sum(caps.values()):
        raise ValueError(f"target {target} exceeds max_sparsity {max_sparsity} in every layer")

    def counts(thr: float) -> dict[str, int]:
        t = torch.tensor([thr])
        return {
            k: min(int(torch.searchsorted(s, t, right=True)), caps[k]) for k, s in sorted_.items()
        }

    lo = min(float(s[0]) for s in sorted_.values()) - 1.0
    hi = max(float(s[-1]) for s in sorted_.values())
    for _ in range(200):  # bisection on the threshold: counts are monotone in it
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if sum(counts(mid).values()) >= want:
            hi = mid
        else:
            lo = mid
    got = counts(hi)
    return {k: got[k] / sizes[k] for k in sizes}
