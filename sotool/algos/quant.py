"""Uniform integer grids: fit scale/zero, quantize, dequantize, round-to-nearest.

Conventions (those of the GPTQ checkpoint format): codes q are unsigned integers in
[0, 2^b − 1]; a weight is dequantized as scale · (q − zero). Symmetric grids fix
zero = 2^(b−1) (8 for 4-bit) and scale = 2·max|w| / (2^b − 1); asymmetric grids span
[min(w, 0), max(w, 0)]. Groups are `group_size` consecutive input columns (the last
group may be partial); group_size −1 means one group per output row (per channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    """A quantization grid: bit-width, group size (−1 = per channel), symmetry."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    mse: bool = False  # search a clipping range per row/group instead of plain min/max

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, cols: int) -> int:
        """Number of column groups for a layer with `cols` inputs."""
        return 1 if self.group_size <= 0 else math.ceil(cols / self.group_size)

    def group_cols(self, cols: int) -> int:
        return cols if self.group_size <= 0 else self.group_size


CLIP_STEPS = 20  # shrink factors 1.0, 0.975, ..., 0.525 tried by the MSE search
_VECTOR_LIMIT = 1 << 18  # elements of w searched per chunk (a chunk stays in cache)


def fit_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of w (..., rows, cols), over all its columns.

    With `spec.mse`, the range [min, max] is shrunk by the factor (of CLIP_STEPS) that
    minimises the squared rounding error Σ(w − Q(w))² per row, trading clipped
    outliers for a finer grid (the widest of equally good ranges wins).

    Returns:
        scale (..., rows) float32 > 0, zero (..., rows) float32 holding integers.
    """
    w = w.float()
    wmin = torch.clamp(w.amin(dim=-1), max=0)
    wmax = torch.clamp(w.amax(dim=-1), min=0)
    if not spec.mse:
        return _grid(wmin, wmax, spec)
    shrink = (1 - torch.arange(CLIP_STEPS, dtype=torch.float32) / (2 * CLIP_STEPS)).tolist()
    flat, lo, hi = w.reshape(-1, w.shape[-1]), wmin.reshape(-1), wmax.reshape(-1)
    rows, cols = flat.shape
    scale, zero = _grid(lo, hi, spec)  # shrink 1.0, improved below
    best = torch.full_like(lo, math.inf)
    step = max(1, _VECTOR_LIMIT // max(cols, 1))
    work = torch.empty(min(step, rows) * cols, device=w.device)
    # row chunks that fit in cache, each candidate range evaluated in place
    for r0 in range(0, rows, step):
        sl = slice(r0, r0 + step)
        x = flat[sl]
        t = work[: x.numel()].view_as(x)
        for f in shrink:
            s, z = _grid(lo[sl] * f, hi[sl] * f, spec)
            torch.div(x, s[:, None], out=t)
            t.round_().add_(z[:, None]).clamp_(0, spec.maxq).sub_(z[:, None])
            t.mul_(s[:, None]).sub_(x).square_()
            err = t.sum(-1)
            better = err < best[sl]
            best[sl] = torch.where(better, err, best[sl])
            scale[sl] = torch.where(better, s, scale[sl])
            zero[sl] = torch.where(better, z, zero[sl])
    return scale.reshape(wmin.shape), zero.reshape(wmin.shape)


def fit_groups(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of every column group of w (..., rows, cols), groups of
    `spec.group_size` consecutive columns (the last may be partial), all fitted at once.

    Returns:
        scale, zero: (..., rows, groups) float32.
    """
    cols = w.shape[-1]
    gs = spec.group_cols(cols)
    full = cols // gs
    parts = []
    if full:
        body = w[..., : full * gs].reshape(*w.shape[:-1], full, gs)
        parts.append(fit_qparams(body, spec))
    if full * gs < cols:
        s, z = fit_qparams(w[..., full * gs :], spec)
        parts.append((s[..., None], z[..., None]))
    return torch.cat([p[0] for p in parts], -1), torch.cat([p[1] for p in parts], -1)


def _grid(
    wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for ranges [wmin ≤ 0, wmax ≥ 0] (per row)."""
    if spec.sym:
        amax = torch.maximum(wmin.abs(), wmax)
        scale = 2 * amax / spec.maxq
        zero = torch.full_like(scale, float((spec.maxq + 1) // 2))
    else:
        scale = (wmax - wmin) / spec.maxq
        zero = torch.round(-wmin / torch.where(scale > 0, scale, torch.ones_like(scale)))
    dead = scale <= 0
    if dead.any():  # an all-zero row: any grid represents it; pick scale 1
        scale = torch.where(dead, torch.ones_like(scale), scale)
        if not spec.sym:
            zero = torch.where(dead, torch.zeros_like(zero), zero)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes clamp(round(w / scale) + zero, 0, maxq); scale/zero broadcast to w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale · (q − zero)."""
    return scale * (q - zero)


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> torch.Tensor:
    """dequantize(quantize(w)): the nearest grid point, as a float tensor."""
    return dequantize(quantize(w, scale, zero, maxq), scale, zero)


@dataclass
class QuantResult:
    """A quantized weight matrix with everything needed to pack or dequantize it.

    Attributes:
        weight: dequantized weight (out × in), float32.
        codes: integer codes (out × in), uint8.
        scale: (out × groups) float32.
        zero: (out × groups) float32 holding integers.
        g_idx: (in,) int32: the group of each input column.
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor


def rtn(w: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Round-to-nearest with per-group min/max grids: the baseline for every method.

    Args:
        w: (out × in) weight.
        spec: the grid.
    """
    w = w.float()
    cols = w.shape[1]
    gs = spec.group_cols(cols)
    scale, zero = fit_groups(w, spec)
    gi = torch.arange(cols) // gs
    codes = quantize(w, scale[:, gi], zero[:, gi], spec.maxq)
    g_idx = torch.arange(cols, dtype=torch.int32) // gs
    return QuantResult(
        weight=dequant_groups(codes, scale, zero, g_idx),
        codes=codes.to(torch.uint8),
        scale=scale,
        zero=zero,
        g_idx=g_idx,
    )


def dequant_groups(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """Dequantize codes (out × in) with per-group scale/zero (out × groups) and g_idx (in,)."""
    gi = g_idx.long()
    return scale[:, gi] * (codes.float() - zero[:, gi])
