"""`sensitivity`: how much each layer's quantization would cost, by several metrics.

Recipe::

    - calibrate: {}
    - hessians: {}                 # needed by `layerwise` (and by delta: gptq)
    - sensitivity: {metrics: [layerwise, trace], bits: [3, 4], group_sizes: [64]}

Metrics (each optional, each with its own budget):

- `layerwise`: the GPTQ objective tr(ΔW H ΔWᵀ) at every candidate grid, solved from the
  cached layer Hessians (no backprop; the RTN objective is recorded beside it).
- `trace`: HAWQ-V2's average eigenvalue Tr(Hᵢ)/nᵢ of the model loss w.r.t. the layer's
  weights, by Hutchinson (one Rademacher probe over all layers per double backprop).
- `eigen`: HAWQ's top eigenvalue of Hᵢ by power iteration (one layer at a time: budget
  it with `eigen_layers` and `eigen_iters`).
- `fisher`: the empirical Fisher diagonal (squared per-window gradients).

The backprop metrics use the first `samples` calibration windows cut to `seqlen`
tokens. A candidate's cost under trace/eigen is the metric × ‖Q(W) − W‖²; under
fisher ½ΣF(Q(W) − W)²; Q is GPTQ (`delta: gptq`) or round-to-nearest. Everything lands
in `sensitivity.json` for the `search` stage and `sotool report`.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch.nn.attention import SDPBackend, sdpa_kernel

from sotool.algos.gptq import layer_error
from sotool.algos.hessian import normalize
from sotool.algos.quant import QuantResult, QuantSpec, rtn
from sotool.algos.search import quantized_layer_bytes
from sotool.algos.sensitivity import (
    double_backprop_hvp,
    fisher_cost,
    fisher_diagonal,
    hutchinson_trace,
    power_iteration,
    trace_cost,
)
from sotool.errors import SotoolError
from sotool.models.blocks import weight_matrix
from sotool.recipe import Strict
from sotool.registry import register_stage
from sotool.rundir import write_json
from sotool.stages._quant import Bits, _group_ok, check_regexes, clip_search, target_layers
from sotool.stages.gptq import GPTQParams, solve_cached
from sotool.stages.hessians import HessianStore

Metric = Literal["layerwise", "trace", "eigen", "fisher"]
BACKPROP = ("trace", "eigen", "fisher")


def choice_label(bits: int, group_size: int) -> str:
    """'w3g64', or 'w4pc' for per channel."""
    return f"w{bits}" + ("pc" if group_size <= 0 else f"g{group_size}")


class SensitivityParams(Strict):
    """Per-layer sensitivity metrics and the cost of every candidate grid."""

    metrics: list[Metric] = Field(
        default_factory=lambda: ["layerwise", "fisher"],
        min_length=1,
        description="what to compute (fisher: the best predictor on SmolLM2-135M, see README)",
    )
    bits: list[Bits] = Field(default_factory=lambda: [3, 4], min_length=1, description="candidates")
    group_sizes: list[int] = Field(
        default_factory=lambda: [64], min_length=1, description="candidate group sizes (-1 = row)"
    )
    sym: bool = Field(True, description="symmetric grids")
    clip: Literal["minmax", "mse", "auto"] = Field(
        "auto", description="grid range search (as in gptq)"
    )
    delta: Literal["gptq", "rtn"] = Field(
        "gptq", description="quantizer whose error ‖Q(W)−W‖ scores trace/eigen/fisher"
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"], description="regexes of layers to leave out"
    )
    samples: int = Field(
        2,
        gt=0,
        description="calibration windows for the backprop metrics (one Hessian-vector product "
        "of SmolLM2-135M over 2 × 128 tokens takes ~25 s on 2 CPU cores)",
    )
    seqlen: int = Field(128, gt=1, description="tokens per window for the backprop metrics")
    trace_iters: int = Field(16, gt=0, description="Hutchinson probe budget")
    trace_tol: float = Field(1e-3, gt=0, description="stop at this relative change of the trace")
    eigen_iters: int = Field(10, gt=0, description="power iterations per layer")
    eigen_tol: float = Field(1e-3, gt=0, description="stop at this relative eigenvalue change")
    eigen_layers: list[str] = Field(
        default_factory=lambda: [".*"],
        description="regexes of the layers whose top eigenvalue is computed (one HVP per "
        "iteration per layer; the others get none)",
    )

    @field_validator("group_sizes")
    @classmethod
    def _gs(cls, v: list[int]) -> list[int]:
        return [_group_ok(g) for g in v]

    @field_validator("ignore", "eigen_layers")
    @classmethod
    def _re(cls, v: list[str]) -> list[str]:
        return check_regexes(v)

    def candidates(self) -> list[tuple[int, int]]:
        return [(b, g) for b in sorted(set(self.bits)) for g in sorted(set(self.group_sizes))]


def _layers(model: torch.nn.Module, params: SensitivityParams) -> dict[str, torch.nn.Module]:
    return {
        n: m
        for n, m in target_layers(model).items()
        if not any(re.search(p, n) for p in params.ignore)
    }


def _as_out_in(mod: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    return t.t() if type(mod).__name__ == "Conv1D" else t


def backprop_metrics(
    ctx: Any,
    model: torch.nn.Module,
    layers: dict[str, torch.nn.Module],
    params: SensitivityParams,
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor], dict[str, Any]]:
    """Trace/eigen/fisher of the model loss on a few calibration windows.

    Returns:
        (metric -> layer -> value, layer -> Fisher diagonal [out, in], info with timings).
    """
    tokens = ctx.calibration_tokens()[: params.samples, : params.seqlen].to(ctx.device)
    names = list(layers)
    weights = [layers[n].weight for n in names]
    values: dict[str, dict[str, float]] = {}
    info: dict[str, Any] = {"samples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1])}
    fisher: dict[str, torch.Tensor] = {}
    model.to(ctx.device)
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        # the math attention kernel is twice differentiable (the fused CPU one is not)
        with sdpa_kernel([SDPBackend.MATH]):
            return model(input_ids=ids, labels=ids, use_cache=False).loss

    try:
        if "trace" in params.metrics or "eigen" in params.metrics:
            hvp = double_backprop_hvp(loss_of(tokens), weights)
            if "trace" in params.metrics:
                t0 = time.perf_counter()
                est = hutchinson_trace(
                    hvp, weights, max_iters=params.trace_iters, tol=params.trace_tol, seed=ctx.seed
                )
                info["trace"] = {
                    "seconds": time.perf_counter() - t0,
                    "iters": est.iters,
                    "converged": est.converged,
                }
                values["trace"] = {
                    n: float(t) / w.numel()
                    for n, t, w in zip(names, est.trace, weights, strict=True)
                }
            if "eigen" in params.metrics:
                which = [
                    i
                    for i, n in enumerate(names)
                    if any(re.search(p, n) for p in params.eigen_layers)
                ]
                t0 = time.perf_counter()
                with ctx.progress("sensitivity: eigenvalues", None):
                    eig = power_iteration(
                        hvp,
                        weights,
                        which=which,
                        max_iters=params.eigen_iters,
                        tol=params.eigen_tol,
                        seed=ctx.seed,
                    )
                info["eigen"] = {
                    "seconds": time.perf_counter() - t0,
                    "layers": len(which),
                    "mean_iters": float(eig.iters[which].float().mean()) if which else 0.0,
                }
                values["eigen"] = {
                    names[i]: float(eig.eigenvalue[i])
                    for i in which
                    if not math.isnan(eig.eigenvalue[i])
                }
            del hvp
        if "fisher" in params.metrics:
            t0 = time.perf_counter()
            diag = fisher_diagonal(
                [g.detach() for g in torch.autograd.grad(loss_of(ids[None]), weights)]
                for ids in tokens
            )
            info["fisher"] = {"seconds": time.perf_counter() - t0}
            fisher = {n: _as_out_in(layers[n], f).cpu() for n, f in zip(names, diag, strict=True)}
            values["fisher"] = {n: float(f.sum()) / f.numel() for n, f in fisher.items()}
    finally:
        for p, r in saved.items():
            p.requires_grad_(r)
        model.zero_grad(set_to_none=True)
        model.to("cpu")
    return values, fisher, info


def quantize_layers(
    ctx: Any,
    layers: dict[str, torch.nn.Module],
    spec: QuantSpec,
    use_gptq: bool,
    on_layer: Any,
) -> None:
    """Quantize every layer with `spec` (GPTQ from the Hessian cache, or RTN) and call
    on_layer(name, w, result, row) with the layer objective(s) in `row`."""
    hrec = ctx.find("hessians")
    hs = HessianStore(hrec.dir) if hrec is not None else None
    if use_gptq:
        assert hs is not None
        gp = GPTQParams(
            bits=spec.bits,
            group_size=spec.group_size,
            sym=spec.sym,
            clip="mse" if spec.mse else "minmax",
            hessians="cache",
        )

        def solved(results: dict[str, QuantResult], rows: list[dict[str, Any]], _s: Any) -> None:
            for r in rows:
                n = r["layer"]
                on_layer(n, weight_matrix(layers[n]).detach().float(), results[n], r)

        solve_cached(layers, hs, lambda n: spec, gp, solved, device=ctx.device)
        return
    for n, mod in layers.items():
        w = weight_matrix(mod).detach().float()
        res = rtn(w, spec)
        row: dict[str, Any] = {}
        if hs is not None and n in hs:
            row["rtn_loss"] = layer_error(w, res.weight, normalize(*hs.get(n)))
        on_layer(n, w, res, row)


@register_stage(
    "sensitivity",
    SensitivityParams,
    help="per-layer sensitivity (layer-wise GPTQ loss, Hessian trace/eigenvalue, Fisher)",
)
def run(ctx: Any, params: SensitivityParams) -> dict[str, Any]:
    needs_h = "layerwise" in params.metrics or (
        params.delta == "gptq" and any(m in params.metrics for m in BACKPROP)
    )
    if needs_h and ctx.find("hessians") is None:
        raise SotoolError(
            f"stage 'sensitivity' (stages[{ctx.entry.index}]): metric 'layerwise' and "
            "delta: gptq need a 'hessians' stage before it; add '- hessians: {}' or use "
            "delta: rtn with backprop metrics only"
        )
    model = ctx.model()
    layers = _layers(model, params)
    if not layers:
        raise SotoolError("sensitivity.ignore: every layer is ignored; loosen the regexes")
    values: dict[str, dict[str, float]] = {}
    fisher: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {}
    if any(m in params.metrics for m in BACKPROP):
        values, fisher, info = backprop_metrics(ctx, model, layers, params)
    cands = params.candidates()
    table: dict[str, dict[str, Any]] = {}
    for n, mod in layers.items():
        rows, cols = weight_matrix(mod).shape
        table[n] = {
            "shape": [rows, cols],
            "params": rows * cols,
            "bytes": {
                choice_label(b, g): quantized_layer_bytes(rows, cols, b, g) for b, g in cands
            },
            "cost": {m: {} for m in params.metrics},
            **{m: values[m].get(n) for m in values},
        }
    use_gptq = "layerwise" in params.metrics or params.delta == "gptq"
    t_quant = time.perf_counter()
    with ctx.progress("sensitivity: candidates", len(cands) * len(layers)) as bar:
        for b, g in cands:
            label = choice_label(b, g)
            spec = QuantSpec(bits=b, group_size=g, sym=params.sym, mse=clip_search(params.clip, g))

            def on_layer(
                n: str, w: torch.Tensor, res: QuantResult, row: dict[str, Any], label: str = label
            ) -> None:
                e = table[n]
                sq = float((res.weight - w).double().pow(2).sum())
                e.setdefault("sqerr", {})[label] = sq
                if "gptq_loss" in row:
                    e["cost"]["layerwise"][label] = row["gptq_loss"]
                    e.setdefault("rtn_loss", {})[label] = row["rtn_loss"]
                for m in ("trace", "eigen"):
                    if m in params.metrics and e.get(m) is not None:
                        e["cost"][m][label] = trace_cost(e[m], w, res.weight)
                if "fisher" in params.metrics:
                    e["cost"]["fisher"][label] = fisher_cost(fisher[n], w, res.weight)
                bar.advance()

            quantize_layers(ctx, layers, spec, use_gptq, on_layer)
    quant_seconds = time.perf_counter() - t_quant
    if "layerwise" in params.metrics:
        info["layerwise"] = {"seconds": quant_seconds, "candidates": len(cands)}
    out = {
        "metrics": params.metrics,
        "candidates": [{"label": choice_label(b, g), "bits": b, "group_size": g} for b, g in cands],
        "delta": "gptq" if use_gptq else "rtn",
        "sym": params.sym,
        "clip": params.clip,
        "info": info,
        "layers": table,
    }
    write_json(ctx.out_dir / "sensitivity.json", out)
    for m, i in info.items():
        if isinstance(i, dict) and "seconds" in i:
            ctx.console.print(f"  {m}: {i['seconds']:.1f} s")
    return {
        "layers": len(table),
        "metrics": params.metrics,
        "candidates": [c["label"] for c in out["candidates"]],
        "seconds": {m: round(i["seconds"], 2) for m, i in info.items() if isinstance(i, dict)},
    }
