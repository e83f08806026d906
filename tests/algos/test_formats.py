"""Format re-encodings: exact inverses, and agreement with readers written from the
formats' descriptions (and with the compressed-tensors package's own packer)."""

import pytest
import torch

from sotool.algos.formats import (
    from_compressed_tensors,
    from_gptq,
    to_compressed_tensors,
    to_gptq,
    trivial_g_idx,
)


def grid(bits: int, rows: int, cols: int, group: int, sym: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g).to(torch.uint8)
    ng = 1 if group <= 0 else -(-cols // group)
    scale = torch.rand(rows, ng, generator=g) + 0.01
    if sym:
        zero = torch.full((rows, ng), float(2 ** (bits - 1)))
    else:
        zero = torch.randint(1, 2**bits, (rows, ng), generator=g).float()
    g_idx = torch.arange(cols, dtype=torch.int32) // (cols if group <= 0 else group)
    return codes, scale, zero, g_idx


def unpack_stream(words: list[int], bits: int, n: int) -> list[int]:
    """Reader from the description: one LSB-first bit stream over consecutive words."""
    stream = 0
    for k, w in enumerate(words):
        stream |= (w & 0xFFFFFFFF) << (32 * k)
    return [(stream >> (bits * i)) & (2**bits - 1) for i in range(n)]


def gptq_reader(t: dict, bits: int, out_features: int, v1: bool):
    """Independent GPTQ reader: qweight (in·b/32, out) packed along the input dim,
    qzeros (groups, out·b/32) along the output dim holding zero−1 (v1), scales (groups,
    out), weight[o, i] = scales[g_idx[i], o] · (q − z)."""
    g_idx = t["g_idx"].tolist()
    cols = len(g_idx)
    qw, qz = t["qweight"].tolist(), t["qzeros"].tolist()
    codes = torch.tensor(
        [unpack_stream([row[o] for row in qw], bits, cols) for o in range(out_features)]
    )
    zeros = torch.tensor([unpack_stream(r, bits, out_features) for r in qz]).T + (1 if v1 else 0)
    scales = t["scales"].float().T
    gi = torch.tensor(g_idx).long()
    weight = scales[:, gi] * (codes.float() - zeros[:, gi].float())
    return codes, zeros, weight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("cols", "group"), [(96, 32), (100, -1), (72, 32)])
@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_roundtrip_and_package_packer(bits, cols, group, sym):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes, scale, zero, _ = grid(bits, 40, cols, group, sym, seed=bits + cols)
    t = to_compressed_tensors(codes, scale, zero, bits, sym, torch.float32)
    assert t["weight_packed"].shape == (40, -(-cols * bits // 32))
    c2, s2, z2 = from_compressed_tensors(t, bits)
    assert torch.equal(c2, codes.int()) and torch.equal(s2, scale) and torch.equal(z2, zero)
    assert ("weight_zero_point" in t) == (not sym)
    # the package's packer, given signed values q − 2^(b−1), writes the same words
    signed = (codes.int() - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_to_int32(signed, bits), t["weight_packed"])
    if not sym:
        zs = (zero.int() - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(pack_to_int32(zs, bits, packed_dim=0), t["weight_zero_point"])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("v1", [True, False])
def test_gptq_roundtrip_and_independent_reader(bits, sym, v1):
    codes, scale, zero, g_idx = grid(bits, 40, 96, 32, sym, seed=bits)
    g_idx = g_idx[torch.randperm(96, generator=torch.Generator().manual_seed(1))]  # act-order
    t = to_gptq(codes, scale, zero, g_idx, bits, v1)
    assert t["qweight"].shape == (96 * bits // 32, 40)
    assert t["qzeros"].shape == (3, -(-40 * bits // 32)) and t["scales"].dtype == torch.float16
    c2, s2, z2, gi2 = from_gptq(t, bits, 40, v1)
    assert torch.equal(c2, codes.int()) and torch.equal(z2, zero) and torch.equal(gi2, g_idx)
    assert torch.equal(s2, scale.half().float())
    rc, rz, rw = gptq_reader(t, bits, 40, v1)
    assert torch.equal(rc, codes.long()) and torch.equal(rz.float(), zero)
    want = scale.half().float()[:, g_idx.long()] * (codes.float() - zero[:, g_idx.long()])
    assert torch.equal(rw, want)


def test_gptq_v1_cannot_hold_zero_point_0():
    codes, scale, zero, g_idx = grid(4, 8, 32, 32, sym=False)
    zero[0, 0] = 0
    with pytest.raises(ValueError, match="zero point of 0"):
        to_gptq(codes, scale, zero, g_idx, 4, v1=True)
    c, _, z, _ = from_gptq(to_gptq(codes, scale, zero, g_idx, 4, v1=False), 4, 8, v1=False)
    assert torch.equal(z, zero) and torch.equal(c, codes.int())


def test_symmetric_needs_midpoint_zero_and_trivial_g_idx():
    codes, scale, zero, g_idx = grid(4, 8, 64, 32, sym=True)
    with pytest.raises(ValueError, match="zero point at 8"):
        to_compressed_tensors(codes, scale, zero - 1, 4, True)
    assert trivial_g_idx(g_idx, 32) and not trivial_g_idx(g_idx.flip(0), 32)
    assert trivial_g_idx(torch.zeros(64, dtype=torch.int32), -1)
