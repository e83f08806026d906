import torch

from sotool.algos.quant import QuantSpec, dequant_groups, fit_qparams, rtn


def test_rtn_hand_computed_asymmetric():
    # one row, 4 columns, 2-bit asymmetric per channel: grid spans [min(w,0), max(w,0)]
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    res = rtn(w, QuantSpec(bits=2, group_size=-1, sym=False))
    # scale = (2 - (-1)) / 3 = 1, zero = round(1 / 1) = 1
    assert torch.allclose(res.scale, torch.tensor([[1.0]]))
    assert torch.equal(res.zero, torch.tensor([[1.0]]))
    # codes = clamp(round(w) + 1, 0, 3) = [0, 1, 1 (0.5 rounds to even 0), 3]
    assert res.codes.tolist() == [[0, 1, 1, 3]]
    assert torch.allclose(res.weight, torch.tensor([[-1.0, 0.0, 0.0, 2.0]]))


def test_rtn_hand_computed_symmetric_groups():
    w = torch.tensor([[1.5, -3.0, 0.2, 0.1, 7.0]])
    res = rtn(w, QuantSpec(bits=4, group_size=2, sym=True))
    # three groups (last one partial): [1.5,-3], [0.2,0.1], [7]
    assert res.scale.shape == (1, 3)
    assert res.g_idx.tolist() == [0, 0, 1, 1, 2]
    assert torch.allclose(res.scale[0], torch.tensor([6.0 / 15, 0.4 / 15, 14.0 / 15]))
    assert torch.equal(res.zero, torch.full((1, 3), 8.0))
    # -3.0 / 0.4 = -7.5 -> rounds to -8 -> code 0; 1.5 / 0.4 = 3.75 -> 4 -> code 12
    assert res.codes[0, :2].tolist() == [12, 0]
    assert res.codes[0, 4].item() == 15  # 7 / (14/15) = 7.5 -> 8 -> 16 clamps to 15


def test_rtn_weight_is_dequantized_codes_and_error_bounded():
    torch.manual_seed(0)
    w = torch.randn(16, 96)
    for spec in [QuantSpec(3, 32, False), QuantSpec(4, -1, True), QuantSpec(8, 64, True)]:
        r = rtn(w, spec)
        assert torch.equal(r.weight, dequant_groups(r.codes, r.scale, r.zero, r.g_idx))
        assert int(r.codes.max()) <= spec.maxq
        # asymmetric grids never clip: error at most half a step
        if not spec.sym:
            step = r.scale[:, r.g_idx.long()]
            assert ((r.weight - w).abs() <= step / 2 + 1e-6).all()


def test_zero_rows_get_unit_scale():
    s, z = fit_qparams(torch.zeros(3, 8), QuantSpec(4, -1, False))
    assert torch.equal(s, torch.ones(3)) and torch.equal(z, torch.zeros(3))


def test_mse_clip_never_worse_than_minmax():
    torch.manual_seed(2)
    w = torch.randn(64, 128)
    w[:, 0] *= 8  # outliers make clipping worthwhile
    for bits in (2, 3, 4):
        for sym in (True, False):
            plain = rtn(w, QuantSpec(bits, 32, sym))
            mse = rtn(w, QuantSpec(bits, 32, sym, mse=True))
            e_plain = (plain.weight - w).pow(2).sum()
            e_mse = (mse.weight - w).pow(2).sum()
            assert e_mse <= e_plain + 1e-4
    assert (rtn(w, QuantSpec(3, -1, True, mse=True)).weight - w).pow(2).sum() < (
        rtn(w, QuantSpec(3, -1, True)).weight - w
    ).pow(2).sum()


def test_mse_search_vectorized_equals_loop(monkeypatch):
    import sotool.algos.quant as q

    torch.manual_seed(3)
    w = torch.randn(3, 40, 64)
    spec = QuantSpec(3, -1, False, mse=True)
    a = q.fit_qparams(w, spec)
    monkeypatch.setattr(q, "_VECTOR_LIMIT", 0)
    b = q.fit_qparams(w, spec)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mse_search_equals_brute_force():
    """Each row's grid is the widest of the CLIP_STEPS shrunk ranges with the least
    squared rounding error, checked one row and one candidate at a time."""
    import sotool.algos.quant as q

    torch.manual_seed(4)
    w = torch.randn(2, 6, 48) * torch.rand(2, 6, 1)
    w[0, 0, :5] *= 8  # outliers: a shrunk range wins
    for sym in (True, False):
        spec = QuantSpec(3, -1, sym, mse=True)
        s, z = q.fit_qparams(w, spec)
        flat, shrunk = w.reshape(-1, 48), 0
        for r in range(flat.shape[0]):
            row = flat[r]
            lo, hi = torch.clamp(row.min(), max=0), torch.clamp(row.max(), min=0)
            errs = []
            for k in range(q.CLIP_STEPS):
                f = 1 - torch.tensor(k, dtype=torch.float32) / (2 * q.CLIP_STEPS)
                sk, zk = q._grid(lo * f, hi * f, spec)
                errs.append(float(((q.fake_quantize(row, sk, zk, spec.maxq) - row) ** 2).sum()))
            k = min(range(len(errs)), key=lambda i: (errs[i], i))
            f = 1 - torch.tensor(k, dtype=torch.float32) / (2 * q.CLIP_STEPS)
            sk, zk = q._grid(lo * f, hi * f, spec)
            assert torch.allclose(s.reshape(-1)[r], sk) and z.reshape(-1)[r] == zk
            shrunk += k > 0
        assert shrunk > 0
