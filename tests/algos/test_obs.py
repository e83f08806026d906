import pytest
import torch

from sotool.algos.mfac import StaticMFAC
from sotool.algos.obs import (
    allocate_sparsity,
    block_fisher_inverse,
    fisher_damp,
    fisher_loss,
    group_saliency,
    mfac_saliency,
    obert_prune,
    obs_update,
    to_blocks,
    weight_saliency,
)
from sotool.algos.prune import Pattern


def grads_problem(seed, rows=8, cols=32, m=48):
    """Correlated per-sample gradients (low-rank mixing plus noise, uneven scales)."""
    gen = torch.Generator().manual_seed(seed)
    d = rows * cols
    w = torch.randn(rows, cols, generator=gen)
    basis = torch.randn(6, d, generator=gen)
    scale = torch.exp(torch.randn(d, generator=gen))
    g = (torch.randn(m, 6, generator=gen) @ basis + 0.3 * torch.randn(m, d, generator=gen)) * scale
    return w, g


def dense_block_inverse(g, lam, s, e):
    gb = g[:, s:e].double()
    return torch.linalg.inv(lam * torch.eye(e - s, dtype=torch.float64) + gb.T @ gb / g.shape[0])


def test_obs_update_matches_dense_formula():
    w, g = grads_problem(0)
    b, lam = 16, fisher_damp(g, 0.05)
    finv = block_fisher_inverse(g, b, lam)
    wb = to_blocks(w, b)
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(wb.shape, generator=gen) < 0.4
    got = obs_update(wb, finv, mask)
    for i in range(wb.shape[0]):
        fi = dense_block_inverse(g, lam, i * b, (i + 1) * b)
        q = mask[i].nonzero().flatten()
        wi = wb[i].double()
        delta = -fi[:, q] @ torch.linalg.solve(fi[q][:, q], wi[q])
        want = wi + delta
        assert torch.allclose(got[i].double(), want, atol=1e-4, rtol=1e-4)
        assert (got[i][mask[i]] == 0).all()


def test_obs_cost_equals_fisher_quadratic_of_update():
    """½ w_Qᵀ([F⁻¹]_QQ)⁻¹ w_Q (the predicted cost) = ½ δwᵀ F δw of the applied update."""
    w, g = grads_problem(1)
    b, lam = 16, fisher_damp(g, 0.05)
    finv = block_fisher_inverse(g, b, lam)
    pat = Pattern.parse("block4", 0.5)
    res = obert_prune(w, g, pat, block=b, damp=0.05)
    wb, mb = to_blocks(w, b), to_blocks(res.mask, b).bool()
    predicted = 0.0
    for i in range(wb.shape[0]):
        q = mb[i].nonzero().flatten()
        fq = finv[i].double()[q][:, q]
        predicted += float(0.5 * wb[i, q].double() @ torch.linalg.solve(fq, wb[i, q].double()))
    actual = fisher_loss(res.weight - w, g, lam, b)
    assert abs(actual - predicted) / predicted < 1e-3


def test_saliencies_match_dense():
    w, g = grads_problem(2)
    b, lam = 16, fisher_damp(g, 0.05)
    finv = block_fisher_inverse(g, b, lam)
    wb = to_blocks(w, b)
    fi = dense_block_inverse(g, lam, 0, b)
    single = weight_saliency(wb, finv)[0].double()
    assert torch.allclose(single, wb[0].double() ** 2 / (2 * fi.diagonal()), rtol=1e-4)
    grp = group_saliency(wb, finv, 4)[0].double()
    for j in range(4):
        sl = slice(4 * j, 4 * j + 4)
        want = 0.5 * wb[0, sl].double() @ torch.linalg.solve(fi[sl, sl], wb[0, sl].double())
        assert abs(float(grp[j] - want)) <= 1e-4 * float(want)


PATTERNS = ["unstructured", "2:4", "4:8", "block4"]


@pytest.mark.parametrize("text", PATTERNS)
def test_obert_mask_has_exact_pattern(text):
    w, g = grads_problem(3)
    pat = Pattern.parse(text, 0.5)
    res = obert_prune(w, g, pat, block=16)
    m = res.mask
    assert (res.weight[m] == 0).all() and (res.weight[~m] != 0).all()
    if pat.kind == "nm":
        assert (m.view(8, -1, pat.m).sum(-1) == pat.n).all()
    elif pat.kind == "block":
        grp = m.view(8, -1, 4)
        assert (grp.all(-1) | (~grp).all(-1)).all()
        assert int(grp.all(-1).sum()) == round(0.5 * grp.shape[0] * grp.shape[1])
    else:
        assert int(m.sum()) == round(0.5 * m.numel())


@pytest.mark.parametrize("text", ["unstructured", "block4"])
def test_obert_beats_magnitude_on_fisher_loss(text):
    pat = Pattern.parse(text, 0.5)
    ratios = []
    for seed in range(10):
        w, g = grads_problem(seed)
        res = obert_prune(w, g, pat, block=16, damp=0.05)
        from sotool.algos.prune import magnitude_prune

        mag = w.masked_fill(magnitude_prune(w, pat), 0)
        ratios.append(
            fisher_loss(res.weight - w, g, res.lam, 16) / fisher_loss(mag - w, g, res.lam, 16)
        )
    assert max(ratios) < 0.6, ratios


def test_block_layout_errors():
    w, g = grads_problem(0, cols=30)
    with pytest.raises(ValueError, match="multiples of 4"):
        obert_prune(w, g, Pattern.parse("block4", 0.5), block=16)
    with pytest.raises(ValueError, match="multiples of 4"):
        obert_prune(*grads_problem(0), Pattern.parse("block4", 0.5), block=18)


def test_mfac_saliency_uses_full_fisher_diagonal():
    w, g = grads_problem(4, rows=4, cols=16)
    lam = fisher_damp(g, 0.05)
    f = lam * torch.eye(64, dtype=torch.float64) + g.double().T @ g.double() / g.shape[0]
    want = w.double().reshape(-1) ** 2 / (2 * torch.linalg.inv(f).diagonal())
    got = mfac_saliency(w, g, 0.05).reshape(-1).double()
    assert torch.allclose(got, want, rtol=1e-4)
    assert torch.allclose(StaticMFAC(g, lam).diag(), torch.linalg.inv(f).diagonal(), rtol=1e-4)


def test_allocate_sparsity_global_threshold():
    gen = torch.Generator().manual_seed(0)
    scores = {
        "small": torch.rand(1000, generator=gen) * 0.1,  # cheap to prune
        "mid": torch.rand(3000, generator=gen),
        "big": torch.rand(2000, generator=gen) * 10,  # expensive
    }
    alloc = allocate_sparsity(scores, 0.5, max_sparsity=0.9)
    removed = sum(alloc[k] * scores[k].numel() for k in scores)
    assert abs(removed - 3000) <= 1
    assert alloc["small"] == pytest.approx(0.9)  # capped
    assert alloc["small"] > alloc["mid"] > alloc["big"]
    # the layers not at the cap share one threshold
    thr = torch.sort(scores["mid"]).values[round(alloc["mid"] * 3000) - 1]
    assert abs(alloc["big"] - float((scores["big"] <= thr).float().mean())) <= 1 / 2000
    with pytest.raises(ValueError, match="max_sparsity"):
        allocate_sparsity(scores, 0.95, max_sparsity=0.9)
