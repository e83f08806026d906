import pytest
import torch

from sotool.algos.gptq import layer_error
from sotool.algos.prune import Pattern, magnitude_prune, sparsegpt


def problem(seed, rows=32, cols=128, n=1024):
    """Correlated inputs whose channels have log-normal scales, as LLM activations do."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) * (0.5 / cols**0.5) + torch.eye(cols)
    scale = torch.exp(torch.randn(cols, generator=g))
    x = scale[:, None] * (mix @ torch.randn(cols, n, generator=g))
    return w, x @ x.T / n


PATTERNS = [
    Pattern.parse("unstructured", 0.5),
    Pattern.parse("2:4", 0),
    Pattern.parse("4:8", 0),
    Pattern.parse("block4", 0.5),
]


@pytest.mark.parametrize("pat", PATTERNS, ids=lambda p: f"{p.kind}{p.n}{p.m}{p.size}")
def test_mask_has_exact_pattern(pat):
    w, h = problem(0)
    res = sparsegpt(w, h, pat, block_size=64)
    m = res.mask
    assert (res.weight[m] == 0).all()
    if pat.kind == "nm":
        assert (m.view(32, -1, pat.m).sum(-1) == pat.n).all()
    elif pat.kind == "block":
        g = m.view(32, -1, pat.size)
        assert (g.all(-1) | (~g).all(-1)).all()  # whole groups only
        for i in range(0, 128, 64):  # sparsity per block within one group of weights
            assert abs(int(m[:, i : i + 64].sum()) - 0.5 * 32 * 64) <= pat.size
    else:
        for i in range(0, 128, 64):
            assert abs(int(m[:, i : i + 64].sum()) - 0.5 * 32 * 64) <= 1


@pytest.mark.parametrize("pat", PATTERNS, ids=lambda p: f"{p.kind}{p.n}{p.m}{p.size}")
def test_identity_hessian_mask_equals_magnitude(pat):
    w, _ = problem(1)
    res = sparsegpt(w, torch.eye(128), pat, block_size=64)
    assert torch.equal(res.mask, magnitude_prune(w, pat, block_size=64))
    assert torch.equal(res.weight, w.masked_fill(res.mask, 0))


@pytest.mark.parametrize("pat", PATTERNS[:2], ids=["unstructured", "2:4"])
def test_obs_beats_magnitude_on_correlated_inputs(pat):
    ratios = []
    for seed in range(10):
        w, h = problem(seed)
        res = sparsegpt(w, h, pat)
        mag = w.masked_fill(magnitude_prune(w, pat), 0)
        ratios.append(layer_error(w, res.weight, h) / layer_error(w, mag, h))
    assert max(ratios) < 0.5, ratios


def test_pattern_parse_errors():
    for bad in ["3:2", "x", "block0", "0:4"]:
        with pytest.raises(ValueError):
            Pattern.parse(bad, 0.5)


@pytest.mark.parametrize("pat", PATTERNS, ids=lambda p: f"{p.kind}{p.n}{p.m}{p.size}")
def test_batch_equals_one_layer_at_a_time(pat):
    """Layers solved together (each with its own Hessian and its own mask budget)
    get what each gets alone."""
    from sotool.algos.prune import sparsegpt_batch

    probs = [problem(s) for s in (11, 12, 13)]
    w = torch.stack([p[0] for p in probs])
    h = torch.stack([p[1] for p in probs])
    batch = sparsegpt_batch(w, h, pat, block_size=64)
    for b, (wb, hb) in enumerate(probs):
        one = sparsegpt(wb, hb, pat, block_size=64)
        assert torch.equal(batch[b].mask, one.mask)
        assert torch.allclose(batch[b].weight, one.weight, atol=1e-5)
    assert not torch.equal(batch[0].mask, batch[1].mask)
