"""`search`: the per-layer grid allocation minimising predicted damage under a size budget.

Recipe::

    - sensitivity: {metrics: [layerwise, trace], bits: [3, 4], group_sizes: [64]}
    - search: {metric: layerwise, budget: {avg_bits: 3.5}}
    - gptq: {hessians: cache}            # quantizes each layer with its searched grid

Costs Ωᵢ(choice) come from the `sensitivity` stage (the chosen metric); the search is an
exact multiple-choice knapsack (sotool.algos.search). Budgets:

- `avg_bits`: average bits per weight of the *codes* (Σ bᵢnᵢ ≤ avg_bits·Σnᵢ, exact in
  integers), the "W3.5" of the literature; scales/zeros/g_idx come on top.
- `bytes`: total bytes of the quantized layers in the GPTQ checkpoint layout (codes,
  fp16 scales, packed zeros, g_idx; see `quantized_layer_bytes`), met exactly.

Writes `allocation.json` (layer → bits, group size, predicted cost, bytes) and
`frontier.json` (every Pareto-optimal size with its predicted cost). A later `gptq`
stage picks the allocation up.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from pydantic import Field, model_validator

from sotool.algos.search import allocate, pareto_frontier
from sotool.errors import SotoolError
from sotool.recipe import Strict
from sotool.registry import register_stage
from sotool.rundir import read_json, write_json
from sotool.stages.sensitivity import Metric


class Budget(Strict):
    """Exactly one of avg_bits or bytes."""

    avg_bits: float | None = Field(None, gt=0, description="average code bits per weight")
    bytes: int | None = Field(None, gt=0, description="total bytes of the quantized layers")

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if (self.avg_bits is None) == (self.bytes is None):
            raise ValueError("give exactly one of avg_bits or bytes, e.g. {avg_bits: 3.5}")
        return self


class SearchParams(Strict):
    """Allocate candidate grids per layer from a `sensitivity` stage's costs."""

    metric: Metric = Field("layerwise", description="which sensitivity metric's costs to use")
    candidates: list[str] | None = Field(
        None, description="labels to choose from, e.g. [w3g64, w4g64] (default: all computed)"
    )
    budget: Budget = Field(description="size budget: {avg_bits: 3.5} or {bytes: N}")


def _problem(
    sens: dict[str, Any], params: SearchParams
) -> tuple[list[str], list[dict[str, Any]], list[list[float]], list[list[int]], list[list[int]]]:
    """(layer names, candidates, costs, sizes in the budget's unit, bytes) per layer."""
    if params.metric not in sens["metrics"]:
        raise SotoolError(
            f"search.metric: {params.metric!r} was not computed by the sensitivity stage "
            f"(it has {', '.join(sens['metrics'])}); add it to sensitivity.metrics"
        )
    cands = sens["candidates"]
    if params.candidates is not None:
        known = {c["label"] for c in cands}
        bad = [c for c in params.candidates if c not in known]
        if bad:
            raise SotoolError(
                f"search.candidates: {bad} not computed (known: {', '.join(sorted(known))}); "
                "add their bits/group sizes to the sensitivity stage"
            )
        cands = [c for c in cands if c["label"] in params.candidates]
    names, costs, sizes, nbytes = [], [], [], []
    for n, e in sens["layers"].items():
        cost = e["cost"][params.metric]
        missing = [c["label"] for c in cands if c["label"] not in cost]
        if missing:
            raise SotoolError(
                f"search.metric: layer {n} has no {params.metric!r} cost (e.g. no eigenvalue: "
                "widen sensitivity.eigen_layers, or pick another metric)"
            )
        names.append(n)
        costs.append([float(cost[c["label"]]) for c in cands])
        nbytes.append([int(e["bytes"][c["label"]]) for c in cands])
        if params.budget.bytes is not None:
            sizes.append(nbytes[-1])
        else:
            sizes.append([int(c["bits"]) * int(e["params"]) for c in cands])
    return names, cands, costs, sizes, nbytes


def _budget(params: SearchParams, sens: dict[str, Any]) -> int:
    if params.budget.bytes is not None:
        return params.budget.bytes
    n = sum(int(e["params"]) for e in sens["layers"].values())
    return math.floor(params.budget.avg_bits * n + 1e-9)


@register_stage(
    "search",
    SearchParams,
    help="exact mixed-precision allocation under a size budget (and the Pareto frontier)",
)
def run(ctx: Any, params: SearchParams) -> dict[str, Any]:
    sens = read_json(ctx.require("sensitivity").dir / "sensitivity.json")
    names, cands, costs, sizes, nbytes = _problem(sens, params)
    budget = _budget(params, sens)
    weights = [int(e["params"]) for e in sens["layers"].values()]
    total_w = sum(weights)
    try:
        best = allocate(costs, sizes, budget)
        front = pareto_frontier(costs, sizes)
    except ValueError as e:
        raise SotoolError(f"search.budget: {e}; raise the budget or add cheaper candidates") from e

    def describe(choice: list[int]) -> dict[str, Any]:
        b = sum(nbytes[i][j] for i, j in enumerate(choice))
        bits = sum(int(cands[j]["bits"]) * weights[i] for i, j in enumerate(choice))
        counts = Counter(cands[j]["label"] for j in choice)
        return {"bytes": b, "avg_bits": bits / total_w, "counts": dict(sorted(counts.items()))}

    layers = {
        n: {
            "label": cands[j]["label"],
            "bits": int(cands[j]["bits"]),
            "group_size": int(cands[j]["group_size"]),
            "cost": costs[i][j],
            "bytes": nbytes[i][j],
        }
        for i, (n, j) in enumerate(zip(names, best.choice, strict=True))
    }
    d = describe(best.choice)
    alloc = {
        "metric": params.metric,
        "budget": params.budget.model_dump(exclude_none=True),
        "budget_units": budget,
        "unit": "bytes" if params.budget.bytes is not None else "code bits",
        "predicted_cost": best.cost,
        "total_bytes": d["bytes"],
        "avg_bits": d["avg_bits"],
        "counts": d["counts"],
        "layers": layers,
    }
    frontier = [{"size": s, "cost": c, **describe(ch)} for s, c, ch in front]
    write_json(ctx.out_dir / "allocation.json", alloc)
    write_json(ctx.out_dir / "frontier.json", frontier)
    ctx.console.print(
        f"  {params.metric}: {d['avg_bits']:.3f} average bits, {d['bytes']} bytes, "
        f"predicted cost {best.cost:.4g}; {', '.join(f'{k}×{v}' for k, v in d['counts'].items())}"
    )
    return {
        "metric": params.metric,
        "avg_bits": d["avg_bits"],
        "bytes": d["bytes"],
        "predicted_cost": best.cost,
        "counts": d["counts"],
        "frontier_points": len(frontier),
    }
