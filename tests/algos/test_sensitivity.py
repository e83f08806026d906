"""Hutchinson trace and power iteration against the exact Hessian of a tiny model."""

from __future__ import annotations

import torch

from sotool.algos.sensitivity import (
    double_backprop_hvp,
    fisher_cost,
    fisher_diagonal,
    hutchinson_trace,
    power_iteration,
    summed_hvp,
    trace_cost,
)


def _problem(seed: int = 0):
    """A two-layer MLP (softplus) with a cross-entropy loss; returns (params, loss_of)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    w1 = torch.randn(5, 6, generator=g, dtype=torch.float64)
    w2 = torch.randn(3, 5, generator=g, dtype=torch.float64)

    def loss_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(torch.nn.functional.softplus(x @ a.t()) @ b.t(), y)

    return [w1, w2], loss_of


def _exact_blocks(params, loss_of) -> list[torch.Tensor]:
    full = torch.autograd.functional.hessian(loss_of, tuple(params))
    return [full[i][i].reshape(p.numel(), p.numel()) for i, p in enumerate(params)]


def _hvp(params, loss_of):
    ps = [p.clone().requires_grad_(True) for p in params]
    return double_backprop_hvp(loss_of(*ps), ps), ps


def test_hutchinson_within_5_percent_of_exact_trace():
    params, loss_of = _problem()
    blocks = _exact_blocks(params, loss_of)
    hvp, ps = _hvp(params, loss_of)
    est = hutchinson_trace(hvp, ps, max_iters=6000, min_iters=200, tol=1e-5, seed=1)
    exact = torch.tensor([float(b.diagonal().sum()) for b in blocks], dtype=torch.float64)
    assert est.iters >= 200 and est.history.shape == (est.iters, 2)
    rel = (est.trace - exact).abs() / exact.abs()
    assert bool((rel < 0.05).all()), (est.trace, exact)


def test_hutchinson_stops_on_tolerance_and_respects_budget():
    params, loss_of = _problem(1)
    hvp, ps = _hvp(params, loss_of)
    loose = hutchinson_trace(hvp, ps, max_iters=500, tol=0.2, seed=0)
    assert loose.converged and loose.iters < 500
    capped = hutchinson_trace(hvp, ps, max_iters=5, tol=1e-12, seed=0)
    assert capped.iters == 5 and not capped.converged


def test_power_iteration_within_1_percent_of_exact_top_eigenvalue():
    params, loss_of = _problem(2)
    blocks = _exact_blocks(params, loss_of)
    hvp, ps = _hvp(params, loss_of)
    est = power_iteration(hvp, ps, max_iters=500, tol=1e-7, seed=0)
    for i, b in enumerate(blocks):
        ev = torch.linalg.eigvalsh(b)
        top = float(ev[ev.abs().argmax()])
        assert abs(float(est.eigenvalue[i]) - top) <= 0.01 * abs(top), (i, est.eigenvalue, top)
    only = power_iteration(hvp, ps, which=[1], max_iters=50, seed=0)
    assert torch.isnan(only.eigenvalue[0]) and only.iters[0] == 0 and only.iters[1] > 0


def test_summed_hvp_equals_hvp_of_summed_loss():
    params, loss_of = _problem(3)
    ps = [p.clone().requires_grad_(True) for p in params]
    single = double_backprop_hvp(2 * loss_of(*ps), ps)
    twice = summed_hvp([double_backprop_hvp(loss_of(*ps), ps) for _ in range(2)])
    v = [torch.randn_like(p) for p in ps]
    for a, b in zip(single(v), twice(v), strict=True):
        assert torch.allclose(a, b)


def test_fisher_diagonal_and_costs():
    g = [
        [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])],
        [torch.tensor([3.0, 0.0]), torch.zeros(1, 1)],
    ]
    f = fisher_diagonal(g)
    assert torch.equal(f[0], torch.tensor([5.0, 2.0])) and torch.equal(f[1], torch.tensor([[4.5]]))
    w = torch.tensor([1.0, 1.0])
    wq = torch.tensor([1.5, 0.0])
    assert abs(fisher_cost(f[0], w, wq) - 0.5 * (5 * 0.25 + 2 * 1.0)) < 1e-12
    assert abs(trace_cost(2.0, w, wq) - 2.0 * 1.25) < 1e-12
