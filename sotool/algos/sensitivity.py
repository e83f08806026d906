"""Second-order sensitivity of layers: Hutchinson trace, top eigenvalue, Fisher diagonal.

Everything here works on a Hessian-vector product `hvp(vs) -> Hvs` over a list of K
parameter tensors (the layers), so the estimators are testable on a tiny model whose
full Hessian can be built exactly.

- HAWQ-V2 (average eigenvalue): Tr(Hᵢ)/nᵢ with Tr(Hᵢ) = E[vᵢᵀ(Hv)ᵢ] for a Rademacher
  vector v over *all* parameters. The cross terms vᵢᵀHᵢⱼvⱼ (i ≠ j) have zero mean, so one
  double backprop per probe gives an unbiased estimate for every layer at once.
- HAWQ (top eigenvalue): power iteration on the diagonal block Hᵢ, one layer at a time
  (a probe nonzero only on layer i; only the i-th part of Hv is kept).
- Empirical Fisher diagonal: mean of squared per-sample gradients (no second backprop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

HVP = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def double_backprop_hvp(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> HVP:
    """Hessian-vector products of `loss` w.r.t. `params` by double backprop.

    The gradient graph is built once (create_graph) and kept, so each product costs
    one backward pass through it.

    Args:
        loss: scalar, computed from `params` (which require grad).
        params: K tensors.

    Returns:
        hvp(vs) with vs a list of K tensors shaped like `params`, returning H·v as K
        tensors (the full Hessian applied to the concatenated vector).
    """
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp(vs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        return [o.detach() for o in out]

    return hvp


def summed_hvp(hvps: Sequence[HVP]) -> HVP:
    """The HVP of a sum of losses (e.g. one per calibration batch)."""

    def hvp(vs: list[torch.Tensor]) -> list[torch.Tensor]:
        total = [torch.zeros_like(v) for v in vs]
        for f in hvps:
            for t, h in zip(total, f(vs), strict=True):
                t.add_(h)
        return total

    return hvp


def rademacher_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A tensor shaped like t with independent ±1 entries."""
    r = torch.randint(0, 2, t.shape, generator=generator, dtype=torch.int8)
    return (r.to(t.dtype) * 2 - 1).to(t.device)


@dataclass
class TraceEstimate:
    """Hutchinson estimate of the trace of each diagonal Hessian block.

    Attributes:
        trace: (K,) float64, estimated Tr(Hᵢ) per parameter tensor.
        iters: probes used.
        converged: True when the relative change of every estimate fell below tol.
        history: (iters, K) running means after each probe.
    """

    trace: torch.Tensor
    iters: int
    converged: bool
    history: torch.Tensor = field(repr=False)


def hutchinson_trace(
    hvp: HVP,
    shapes: Sequence[torch.Tensor],
    *,
    max_iters: int = 100,
    min_iters: int = 2,
    tol: float = 1e-3,
    seed: int = 0,
) -> TraceEstimate:
    """Tr(Hᵢ) for every diagonal block i by Hutchinson with Rademacher probes.

    Each probe v spans all K tensors; vᵢᵀ(Hv)ᵢ is an unbiased sample of Tr(Hᵢ). Stops
    when the running mean of every block moves by less than `tol` relative to its
    magnitude (HAWQ-V2's rule) after at least `min_iters` probes.

    Args:
        hvp: Hessian-vector product over the K tensors.
        shapes: K tensors giving the shapes/dtypes/devices of the probes.
        max_iters: probe budget.
        min_iters: probes before the stopping rule applies.
        tol: relative change of the running mean that counts as converged.
        seed: seeds the probes.

    Returns:
        TraceEstimate with trace (K,).
    """
    gen = torch.Generator().manual_seed(seed)
    k = len(shapes)
    total = torch.zeros(k, dtype=torch.float64)
    history = []
    prev: torch.Tensor | None = None
    converged = False
    for it in range(1, max_iters + 1):
        vs = [rademacher_like(t, gen) for t in shapes]
        hv = hvp(vs)
        samples = [float((v * h).sum(dtype=torch.float64)) for v, h in zip(vs, hv, strict=True)]
        total += torch.tensor(samples, dtype=torch.float64)
        mean = total / it
        history.append(mean.clone())
        if prev is not None and it >= min_iters:
            change = (mean - prev).abs() / (prev.abs() + 1e-12)
            if bool((change < tol).all()):
                converged = True
                break
        prev = mean
    return TraceEstimate(total / len(history), len(history), converged, torch.stack(history))


@dataclass
class EigenEstimate:
    """Top eigenvalue (largest |λ|, signed) of each requested diagonal block.

    Attributes:
        eigenvalue: (K,) float64 (NaN for blocks not computed).
        iters: (K,) iterations used per block.
    """

    eigenvalue: torch.Tensor
    iters: torch.Tensor


def power_iteration(
    hvp: HVP,
    shapes: Sequence[torch.Tensor],
    *,
    which: Sequence[int] | None = None,
    max_iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> EigenEstimate:
    """Top eigenvalue of diagonal blocks Hᵢ by power iteration (HAWQ).

    The probe is nonzero only on block i, and only the i-th part of Hv is kept, which
    is Hᵢvᵢ. Stops when the Rayleigh quotient changes by less than `tol` relatively.

    Args:
        hvp: Hessian-vector product over the K tensors.
        shapes: K tensors giving the probe shapes.
        which: indices of the blocks to compute (default: all); one HVP per iteration
            per block, so this is the budget knob.
        max_iters: iterations per block.
        tol: relative change of the eigenvalue estimate that counts as converged.
        seed: seeds the start vectors.

    Returns:
        EigenEstimate with eigenvalue (K,).
    """
    gen = torch.Generator().manual_seed(seed)
    k = len(shapes)
    eig = torch.full((k,), float("nan"), dtype=torch.float64)
    iters = torch.zeros(k, dtype=torch.int64)
    for i in range(k) if which is None else which:
        v = torch.randn(shapes[i].shape, generator=gen, dtype=torch.float64)
        v = (v / v.norm()).to(shapes[i].dtype).to(shapes[i].device)
        vs = [torch.zeros_like(t) for t in shapes]
        lam = None
        for it in range(1, max_iters + 1):
            vs[i] = v
            hv = hvp(vs)[i]
            new = float((v * hv).sum(dtype=torch.float64))  # Rayleigh quotient, ‖v‖ = 1
            norm = hv.norm()
            iters[i] = it
            if float(norm) == 0.0:
                lam = 0.0
                break
            v = hv / norm
            if lam is not None and abs(new - lam) <= tol * (abs(lam) + 1e-12):
                lam = new
                break
            lam = new
        eig[i] = float(lam if lam is not None else 0.0)
    return EigenEstimate(eig, iters)


def fisher_diagonal(grads: Iterable[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Empirical Fisher diagonal: the mean of squared per-sample gradients.

    Args:
        grads: m samples (any iterable, consumed once, so samples can be produced one at
            a time), each K gradient tensors (one per parameter tensor).

    Returns:
        K tensors, diag F = (1/m) Σ g ⊙ g (float32).
    """
    out: list[torch.Tensor] | None = None
    m = 0
    for sample in grads:
        if out is None:
            out = [torch.zeros_like(g, dtype=torch.float32) for g in sample]
        for o, g in zip(out, sample, strict=True):
            o.addcmul_(g.float(), g.float())
        m += 1
    if out is None:
        raise ValueError("fisher_diagonal needs at least one gradient sample")
    return [o / m for o in out]


def trace_cost(avg_eigenvalue: float, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """HAWQ-V2's score of a quantized layer: Tr(H)/n · ‖Q(W) − W‖²."""
    d = (w_hat.float() - w.float()).double()
    return float(avg_eigenvalue * (d * d).sum())


def fisher_cost(fisher_diag: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """½ Σ F_jj (ŵ_j − w_j)²: the second-order loss change under a diagonal Fisher."""
    d = (w_hat.float() - w.float()).double()
    return float(0.5 * (fisher_diag.double() * d * d).sum())
