"""Tensor layouts of the checkpoint formats that serving stacks load, with exact inverses.

sotool's own convention (see `sotool.algos.quant`): a layer's weight W (out × in) is
`scale[o, g_idx[i]] · (codes[o, i] − zero[o, g_idx[i]])` with unsigned codes in
[0, 2^b − 1], float scales and integer-valued zeros (out × groups). Each format below
is a pure re-encoding of those tensors; `from_*` gives back the very same codes,
zeros and (format-dtype) scales.

compressed-tensors `pack-quantized` (one Linear)::

    weight_packed      int32 (out, ceil(in·b/32))   signed q + 2^(b−1) == our codes,
                                                    packed along the input dimension
    weight_scale       float (out, groups)          groups = 1 for per channel
    weight_zero_point  int32 (ceil(out·b/32), groups)   asymmetric only: signed zero
                                                    + 2^(b−1) == our zero, packed along
                                                    the output dimension
    weight_shape       int32 (2,)                   [out, in]

GPTQ (`checkpoint_format` "gptq" = v1, "gptq_v2")::

    qweight  int32 (ceil(in·b/32), out)   codes packed along the input dimension
    qzeros   int32 (groups, ceil(out·b/32))   zero − 1 (v1) or zero (v2), packed
                                          along the output dimension
    scales   float16 (groups, out)
    g_idx    int32 (in,)                  group of each input column

Packing is `sotool.algos.pack`: one least-significant-bit-first stream per packed
line, so 3-bit values spill across words (32 values fill exactly 3 words).
"""

from __future__ import annotations

import torch

from sotool.algos.pack import pack_int32, unpack_int32


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D (out, in) tensor, got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes exceed the {bits}-bit range")


def zeros_to_int(zero: torch.Tensor) -> torch.Tensor:
    """Float zero points holding integers -> int64 (exactly; a fractional one is an error)."""
    z = torch.round(zero)
    if not torch.equal(z, zero.float()):
        raise ValueError("zero points must hold integers")
    return z.to(torch.int64)


def to_compressed_tensors(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """One layer as compressed-tensors `pack-quantized` tensors.

    Args:
        codes: (out, in) unsigned codes in [0, 2^bits).
        scale: (out, groups) float scales.
        zero: (out, groups) integer-valued zeros; symmetric grids must have 2^(bits−1).
        bits: 2..8.
        sym: symmetric grid (no zero point is stored).
        scale_dtype: dtype of `weight_scale`.

    Returns:
        {"weight_packed", "weight_scale", "weight_shape"} (+ "weight_zero_point" if asym).
    """
    _check_codes(codes, bits)
    z = zeros_to_int(zero)
    out = {
        "weight_packed": pack_int32(codes.to(torch.int64), bits, dim=1),
        "weight_scale": scale.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int32),
    }
    if sym:
        if not bool((z == 2 ** (bits - 1)).all()):
            raise ValueError(f"symmetric grids need every zero point at {2 ** (bits - 1)}")
    else:
        out["weight_zero_point"] = pack_int32(z, bits, dim=0)
    return out


def from_compressed_tensors(
    tensors: dict[str, torch.Tensor], bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `to_compressed_tensors`: (codes (out, in) int32, scale, zero float32)."""
    rows, cols = (int(x) for x in tensors["weight_shape"].tolist())
    codes = unpack_int32(tensors["weight_packed"], bits, cols, dim=1)
    scale = tensors["weight_scale"]
    if "weight_zero_point" in tensors:
        zero = unpack_int32(tensors["weight_zero_point"], bits, rows, dim=0).float()
    else:
        zero = torch.full(scale.shape, float(2 ** (bits - 1)))
    return codes, scale.float(), zero


def to_gptq(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    v1: bool = True,
) -> dict[str, torch.Tensor]:
    """One layer as GPTQ checkpoint tensors.

    Args:
        codes: (out, in) unsigned codes in [0, 2^bits).
        scale: (out, groups) float scales (stored as float16).
        zero: (out, groups) integer-valued zeros.
        g_idx: (in,) group of each input column.
        bits: 2, 3, 4 or 8.
        v1: store zero − 1 (checkpoint_format "gptq"); else zero ("gptq_v2").

    Returns:
        {"qweight", "qzeros", "scales", "g_idx"}.

    Raises:
        ValueError: v1 with a zero point of 0 (v1 cannot store it: use v2 or sym).
    """
    _check_codes(codes, bits)
    z = zeros_to_int(zero)
    if v1:
        if z.numel() and int(z.min()) < 1:
            raise ValueError("GPTQ v1 stores zero − 1 and cannot hold a zero point of 0")
        z = z - 1
    return {
        "qweight": pack_int32(codes.to(torch.int64), bits, dim=1).t().contiguous(),
        "qzeros": pack_int32(z, bits, dim=0).t().contiguous(),
        "scales": scale.t().to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def from_gptq(
    tensors: dict[str, torch.Tensor], bits: int, out_features: int, v1: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `to_gptq`: (codes (out, in) int32, scale (out, groups) float32,
    zero (out, groups) float32, g_idx (in,) int32)."""
    g_idx = tensors["g_idx"].to(torch.int32)
    cols = g_idx.shape[0]
    codes = unpack_int32(tensors["qweight"].t(), bits, cols, dim=1)
    zero = unpack_int32(tensors["qzeros"].t(), bits, out_features, dim=0).float()
    if v1:
        zero = zero + 1
    return codes, tensors["scales"].t().float(), zero, g_idx


def trivial_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """Whether g_idx is i // group_size (no runtime column reorder needed)."""
    cols = g_idx.shape[0]
    gs = cols if group_size <= 0 else group_size
    return torch.equal(g_idx.long(), torch.arange(cols) // gs)
