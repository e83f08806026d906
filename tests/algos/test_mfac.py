import torch

from sotool.algos.mfac import BlockFisherInverse, StaticMFAC


def dense_fisher(g: torch.Tensor, damp: float) -> torch.Tensor:
    m, d = g.shape
    return damp * torch.eye(d, dtype=torch.float64) + g.T.double() @ g.double() / m


def test_static_mfac_matches_dense_solve():
    gen = torch.Generator().manual_seed(0)
    for m, d, damp in [(16, 40, 1e-2), (64, 50, 1e-3), (8, 200, 1.0)]:
        g = torch.randn(m, d, generator=gen, dtype=torch.float64)
        f = dense_fisher(g, damp)
        mf = StaticMFAC(g, damp)
        x = torch.randn(d, 3, generator=gen, dtype=torch.float64)
        want = torch.linalg.solve(f, x)
        got = mf.solve(x)
        assert ((got - want).norm() / want.norm()) < 1e-4
        assert torch.allclose(mf.solve(x[:, 0]), want[:, 0], rtol=1e-4, atol=1e-8)
        diag = torch.diagonal(torch.linalg.inv(f))
        assert ((mf.diag() - diag).norm() / diag.norm()) < 1e-4


def test_block_sherman_morrison_equals_dense_block_inverse():
    gen = torch.Generator().manual_seed(1)
    m, d, b, damp = 24, 22, 8, 1e-2
    g = torch.randn(m, d, generator=gen)
    inv = BlockFisherInverse(d, b, damp, m)
    for i in range(m):
        inv.update(g[i])
    f = dense_fisher(g, damp)
    for s in range(0, d, b):
        e = min(s + b, d)
        want = torch.linalg.inv(f[s:e, s:e])
        got = inv.dense()[s:e, s:e].double()
        assert ((got - want).norm() / want.norm()) < 1e-4
    assert (inv.dense()[:8, 8:] == 0).all()  # block-diagonal
