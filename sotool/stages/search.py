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

With `max_degradation`, the allocation is instead the smallest frontier point (within
the budget) whose perplexity, measured on the last `eval_samples` calibration windows,
stays within the bound: a bisection over the frontier, at most `max_evals` measurements,
each candidate grid's weights computed once (as the sensitivity stage quantized them).
These windows also fed the Hessians, so the bound is checked in-sample.

Writes `allocation.json` (layer → bits, group size, predicted cost, bytes) and
`frontier.json` (every Pareto-optimal size with its predicted cost). A later `gptq`
stage picks the allocation up.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from sotool.algos.quant import QuantResult, QuantSpec
from sotool.algos.search import allocate, pareto_frontier
from sotool.errors import SotoolError
from sotool.evaluation import perplexity
from sotool.models.blocks import find_blocks, weight_matrix
from sotool.recipe import Strict
from sotool.registry import register_stage
from sotool.rundir import read_json, write_json
from sotool.stages._quant import clip_search, param_layout, target_layers
from sotool.stages.sensitivity import Metric, quantize_layers


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

    metric: Metric = Field(
        "fisher",
        description="which sensitivity metric's costs to use (fisher predicted measured "
        "damage best on SmolLM2-135M; layerwise needs no backprop)",
    )
    candidates: list[str] | None = Field(
        None, description="labels to choose from, such as w3g64 and w4g64 (default: all computed)"
    )
    budget: Budget = Field(description="size budget: {avg_bits: 3.5} or {bytes: N}")
    max_degradation: float | None = Field(
        None,
        gt=0,
        description="relative perplexity increase allowed (0.1 = +10%): bisect over the "
        "frontier (within the budget) for the smallest allocation whose measured perplexity "
        "meets it",
    )
    eval_samples: int = Field(
        8, gt=0, description="max_degradation: the last N calibration windows measure perplexity"
    )
    max_evals: int = Field(8, gt=0, description="max_degradation: perplexity measurements budget")
    interlayer: Literal["off", "block"] = Field(
        "off",
        description="block: correct the per-layer costs with measured joint effects: each "
        "block's layers are quantized together at the cheapest candidate, the measured "
        "loss increase (last eval_samples windows) over the sum of their predicted costs "
        "rescales that block's costs before the search (one measurement per block)",
    )


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


def _choice(c: dict[str, Any]) -> dict[str, Any]:
    return {"label": c["label"], "bits": int(c["bits"]), "group_size": int(c["group_size"])}


def candidate_weights(
    ctx: Any, layers: dict[str, torch.nn.Module], cands: list[dict[str, Any]], sens: dict[str, Any]
) -> dict[str, dict[str, torch.Tensor]]:
    """label -> layer -> quantized [out, in] weight, as the sensitivity stage quantized
    (GPTQ from the Hessian cache, or round-to-nearest)."""
    out: dict[str, dict[str, torch.Tensor]] = {c["label"]: {} for c in cands}
    for c in cands:
        gs = c["group_size"]
        spec = QuantSpec(c["bits"], gs, sens["sym"], clip_search(sens["clip"], gs))
        got = out[c["label"]]

        def keep(n: str, _w: Any, res: QuantResult, _row: Any, got: dict = got) -> None:
            got[n] = res.weight.cpu()

        quantize_layers(ctx, layers, spec, sens["delta"] == "gptq", keep)
    return out


class Swapper:
    """Measures the model with chosen layers swapped to candidate weights (each
    candidate's weights computed once), on the last `eval_samples` calibration windows;
    `restore()` puts the original weights back."""

    def __init__(
        self, ctx: Any, params: SearchParams, sens: dict[str, Any], names: list[str], cands: list
    ) -> None:
        self.ctx, self.names, self.cands = ctx, names, cands
        self.model = ctx.model()
        self.mods = {n: m for n, m in target_layers(self.model).items() if n in set(names)}
        self.windows = ctx.calibration_tokens()[-params.eval_samples :]
        self.quant = candidate_weights(ctx, self.mods, cands, sens)
        self.original = {n: weight_matrix(m).detach().clone() for n, m in self.mods.items()}

    def measure(self, choice: dict[str, int]) -> dict[str, float]:
        """Perplexity and mean NLL with layer -> candidate index `choice` (others original)."""
        with torch.no_grad():
            for n, m in self.mods.items():
                j = choice.get(n)
                w = self.original[n] if j is None else self.quant[self.cands[j]["label"]][n]
                m.weight.copy_(param_layout(m, w))
        return perplexity(self.model, self.windows, device=self.ctx.device)

    def restore(self) -> None:
        with torch.no_grad():
            for n, m in self.mods.items():
                m.weight.copy_(param_layout(m, self.original[n]))
        self.model.to("cpu")


def block_of(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Layer name -> index (as text) of the transformer block holding it."""
    path = find_blocks(model)[0] + "."
    out = {}
    for n in names:
        b = n[len(path) :].split(".")[0] if n.startswith(path) else ""
        if b.isdigit():
            out[n] = b
    return out


def interlayer_scales(
    swap: Swapper, names: list[str], costs: list[list[float]], sizes: list[list[int]]
) -> dict[str, dict[str, float]]:
    """Per block: the measured NLL increase with all its layers at their cheapest
    candidate, the sum of those layers' predicted costs, and the scale
    measured/predicted (normalised to mean 1 over blocks) that corrects them."""
    of_block: dict[str, list[int]] = {}
    blocks = block_of(swap.model, names)
    for i, n in enumerate(names):
        if n in blocks:
            of_block.setdefault(blocks[n], []).append(i)
    base = swap.measure({})["nll"]
    out: dict[str, dict[str, float]] = {}
    for b, idx in of_block.items():
        cheap = {i: min(range(len(sizes[i])), key=lambda j, i=i: sizes[i][j]) for i in idx}
        measured = swap.measure({names[i]: j for i, j in cheap.items()})["nll"] - base
        predicted = sum(costs[i][j] for i, j in cheap.items())
        out[b] = {"measured_dnll": measured, "predicted": predicted}
        swap.ctx.console.print(
            f"  inter-layer: block {b} at its cheapest grids: ΔNLL {measured:.4g} "
            f"(predicted cost {predicted:.4g})"
        )
    ratios = {
        b: max(e["measured_dnll"], 0.0) / e["predicted"] if e["predicted"] > 0 else 0.0
        for b, e in out.items()
    }
    mean = sum(ratios.values()) / max(len(ratios), 1)
    for b, e in out.items():
        e["scale"] = ratios[b] / mean if mean > 0 else 1.0
    return out


def bisect_measured(
    swap: Swapper,
    params: SearchParams,
    names: list[str],
    front: list[tuple[int, float, list[int]]],
) -> tuple[tuple[int, float, list[int]], list[dict[str, Any]]]:
    """The smallest frontier point whose measured perplexity is within the bound, by
    bisection over the (size-sorted) frontier; measured on the last calibration windows.
    Falls back to the largest point when none is measured within the bound."""
    assert params.max_degradation is not None
    steps: list[dict[str, Any]] = []
    base = swap.measure({})["ppl"]
    bound = base * (1 + params.max_degradation)
    lo, hi = 0, len(front) - 1  # invariant: every point below lo failed
    best = None
    while lo <= hi and len(steps) < params.max_evals:
        mid = (lo + hi) // 2
        ppl = swap.measure(dict(zip(names, front[mid][2], strict=True)))["ppl"]
        ok = ppl <= bound
        steps.append({"size": front[mid][0], "cost": front[mid][1], "ppl": ppl, "ok": ok})
        swap.ctx.console.print(
            f"  bisection: size {front[mid][0]} → ppl {ppl:.3f} "
            f"({'within' if ok else 'over'} {bound:.3f})"
        )
        if ok:
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
    if best is None:
        swap.ctx.console.print(
            "  [yellow]no measured allocation met max_degradation: using the "
            "largest within the budget[/]"
        )
        best = len(front) - 1
    steps.insert(0, {"base_ppl": base, "bound": bound})
    return front[best], steps


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
    swap = None
    scales = None
    try:
        if params.interlayer == "block" or params.max_degradation is not None:
            swap = Swapper(ctx, params, sens, names, cands)
        if params.interlayer == "block":
            assert swap is not None
            scales = interlayer_scales(swap, names, costs, sizes)
            blocks = block_of(swap.model, names)
            costs = [
                [c * scales[blocks[n]]["scale"] for c in row] if n in blocks else row
                for n, row in zip(names, costs, strict=True)
            ]
        try:
            best = allocate(costs, sizes, budget)
            front = pareto_frontier(costs, sizes)
        except ValueError as e:
            raise SotoolError(
                f"search.budget: {e}; raise the budget or add cheaper candidates"
            ) from e
        pick, steps = None, None
        if params.max_degradation is not None:
            assert swap is not None
            pick, steps = bisect_measured(swap, params, names, [f for f in front if f[0] <= budget])
    finally:
        if swap is not None:
            swap.restore()

    def describe(choice: list[int]) -> dict[str, Any]:
        b = sum(nbytes[i][j] for i, j in enumerate(choice))
        bits = sum(int(cands[j]["bits"]) * weights[i] for i, j in enumerate(choice))
        counts = Counter(cands[j]["label"] for j in choice)
        return {"bytes": b, "avg_bits": bits / total_w, "counts": dict(sorted(counts.items()))}

    layers = {
        n: {
            **_choice(cands[j]),
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
    if scales is not None:
        alloc["interlayer"] = scales
    if pick is not None:
        layers = {
            n: {**layers[n], **_choice(cands[j]), "cost": costs[i][j], "bytes": nbytes[i][j]}
            for i, (n, j) in enumerate(zip(names, pick[2], strict=True))
        }
        d = describe(pick[2])
        alloc.update(
            predicted_cost=pick[1],
            total_bytes=d["bytes"],
            avg_bits=d["avg_bits"],
            counts=d["counts"],
            layers=layers,
            bisection=steps,
        )
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
