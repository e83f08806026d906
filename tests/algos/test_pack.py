import pytest
import torch

from sotool.algos.pack import pack_int32, packed_len, unpack_int32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [32, 64, 96, 100, 576])
def test_roundtrip_bit_for_bit(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    v = torch.randint(0, 2**bits, (n, 7), generator=g)
    p = pack_int32(v, bits, dim=0)
    assert p.dtype == torch.int32 and p.shape == (packed_len(n, bits), 7)
    assert torch.equal(unpack_int32(p, bits, n, dim=0), v.to(torch.int32))
    # along the other dimension too
    p1 = pack_int32(v.T, bits, dim=1)
    assert torch.equal(unpack_int32(p1, bits, n, dim=1), v.T.to(torch.int32))


def test_layout_lsb_first_and_3bit_spill():
    v = torch.arange(8).repeat(4)[:32]  # 0..7 repeated: 32 values of 3 bits = 3 words
    p = pack_int32(v[:, None], 3)[:, 0]
    stream = 0
    for i, x in enumerate(v.tolist()):
        stream |= x << (3 * i)
    words = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(3)]
    assert [w & 0xFFFFFFFF for w in p.tolist()] == words
    four = pack_int32(torch.arange(1, 9)[:, None], 4)  # eight nibbles in one word
    assert int(four[0, 0]) & 0xFFFFFFFF == 0x87654321


def test_out_of_range_rejected():
    with pytest.raises(ValueError):
        pack_int32(torch.tensor([4]), 2)
