import torch

from sotool.algos.hessian import HessianSum, weighted_error


def test_incremental_equals_batch():
    torch.manual_seed(0)
    x = torch.randn(7, 33, 24)
    acc = HessianSum(24)
    for i in range(7):
        acc.add(x[i : i + 1])
    flat = x.reshape(-1, 24)
    batch = flat.T @ flat
    assert acc.count == 7 * 33
    assert torch.allclose(acc.sum, batch, rtol=1e-5, atol=1e-4)
    assert torch.allclose(acc.hessian(), batch / (7 * 33), rtol=1e-5, atol=1e-6)


def test_weighted_error_is_output_error():
    torch.manual_seed(1)
    x = torch.randn(200, 12)
    dw = torch.randn(5, 12)
    h = x.T @ x / 200
    direct = float(((x @ dw.T) ** 2).sum() / 200)
    assert abs(weighted_error(dw, h) - direct) < 1e-6 * max(1.0, direct) * 100


def test_banded_upper_accumulation_is_symmetric_and_exact(monkeypatch):
    """Wide inputs go through the banded upper-triangle path; reading `sum` between
    batches (and adding more after) still gives the full symmetric Σxxᵀ."""
    monkeypatch.setattr(HessianSum, "TILE", 10)
    torch.manual_seed(2)
    x = torch.randn(5, 40, 37, dtype=torch.float64).float()
    acc = HessianSum(37)
    for i in range(5):
        acc.add(x[i])
        if i == 2:
            flat = x[:3].reshape(-1, 37)
            assert torch.allclose(acc.sum, flat.T @ flat, rtol=1e-5, atol=1e-4)
    flat = x.reshape(-1, 37)
    assert torch.equal(acc.sum, acc.sum.T)
    assert torch.allclose(acc.sum, flat.T @ flat, rtol=1e-5, atol=1e-4)
    assert acc.count == 200
