"""Bit packing of integer codes into int32 words, with exact inverses.

Values are laid out as one little-endian bit stream along the packed dimension: value i
occupies bits [i·b, (i+1)·b) of the stream, word k holds stream bits [32k, 32k+32),
least-significant bits first. For b = 2, 4, 8 this is "32/b values per word, the
first value in the lowest bits"; for b = 3 a value may spill across two words (32
values fill exactly three words). This is the layout of the GPTQ checkpoint format
(`qweight` packed along the input dimension, `qzeros` along the output dimension).
"""

from __future__ import annotations

import torch


def packed_len(n: int, bits: int) -> int:
    """Number of int32 words for n values of `bits` bits."""
    return -(-n * bits // 32)


def pack_int32(values: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack unsigned integer values (each < 2^bits) along `dim` into int32 words.

    Args:
        values: integer tensor; every entry in [0, 2^bits).
        bits: 1..16.
        dim: the dimension to pack along (its length n becomes ceil(n·bits/32)).
    """
    if not 1 <= bits <= 16:
        raise ValueError("bits must be in 1..16")
    v = values.movedim(dim, 0).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits} bits")
    n = v.shape[0]
    words = packed_len(n, bits)
    out = torch.zeros((words + 1, *v.shape[1:]), dtype=torch.int64, device=v.device)
    offsets = torch.arange(n, device=v.device) * bits
    w_idx, shift = offsets // 32, offsets % 32
    shape = (n,) + (1,) * (v.dim() - 1)
    low = (v << shift.view(shape)) & 0xFFFFFFFF
    out.index_add_(0, w_idx, low)
    spill = shift + bits > 32
    if spill.any():
        high = v[spill] >> (32 - shift[spill]).view((-1,) + (1,) * (v.dim() - 1))
        out.index_add_(0, w_idx[spill] + 1, high)
    out = out[:words]
    out = torch.where(out >= 2**31, out - 2**32, out)  # reinterpret as signed int32
    return out.to(torch.int32).movedim(0, dim)


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 0) -> torch.Tensor:
    """Inverse of `pack_int32`: the first n values along `dim`, as int32."""
    p = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p, torch.zeros_like(p[:1])])
    offsets = torch.arange(n, device=p.device) * bits
    w_idx, shift = offsets // 32, offsets % 32
    shape = (n,) + (1,) * (p.dim() - 1)
    mask = 2**bits - 1
    low = p[w_idx] >> shift.view(shape)
    high = p[w_idx + 1] << (32 - shift).view(shape)
    v = torch.where((shift + bits > 32).view(shape), low | high, low) & mask
    return v.to(torch.int32).movedim(0, dim)
