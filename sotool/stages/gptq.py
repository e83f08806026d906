"""`gptq`: GPTQ quantization of every block layer, from the Hessian cache or sequentially.

Recipe::

    - calibrate: {}
    - hessians: {}                       # needed for `hessians: cache`
    - gptq: {bits: 4, group_size: 128, sym: true, act_order: true, hessians: cache}

`hessians: cache` solves every layer from the `hessians` stage's files (Hessians of the
original model: a sweep of N configs costs one calibration pass plus N solves).
`hessians: sequential` is the paper's procedure: each block's Hessians come from the
outputs of the already quantized blocks before it, and with `true_sequential` each
group of layers inside a block (q/k/v, o, gate/up, down) sees the quantized output of
the groups before it.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from sotool.algos.gptq import GPTQResult, gptq_refit_batch, objectives
from sotool.algos.hessian import normalize
from sotool.algos.quant import QuantResult, QuantSpec
from sotool.memory import release
from sotool.models.blocks import find_blocks, weight_matrix
from sotool.registry import register_stage
from sotool.rundir import read_json, write_json
from sotool.stages._quant import QuantParams, QuantStore, param_layout, target_layers
from sotool.stages.hessians import HessianStore, SharedInputAccumulator, sequential_groups


class GPTQParams(QuantParams):
    """GPTQ with the layer-wise Hessian XXᵀ/n."""

    act_order: bool = Field(True, description="quantize columns by descending Hessian diagonal")
    static_groups: bool = Field(
        True, description="fit group grids before the sweep (g_idx = i // group_size)"
    )
    clip: Literal["minmax", "mse", "auto"] = Field(
        "auto",
        description="grid range: plain min/max, the MSE-best shrunk range, or auto: mse for "
        "groups, minmax per channel (where a clipped row costs more than GPTQ recovers)",
    )
    refit: int | None = Field(
        None,
        ge=0,
        description="sweeps followed by a least-squares refit of each row's scales to its "
        "codes, each sweep on the best grids so far; 0 = plain GPTQ; default: 1 with "
        "sequential Hessians, 0 from the cache (fast sweeps)",
    )
    shrink: list[float] | None = Field(
        None,
        description="scale factors the first sweep tries for every row (each row keeps "
        "the one that ends lowest in the layer objective); default: [1, 0.9, 0.8, 0.7] "
        "per channel, [1] for groups",
    )
    block_size: int = Field(128, gt=0, description="columns per lazy-update block")
    damp: float = Field(0.01, ge=0, description="relative damping λ (raised ×10 on failure)")
    hessians: Literal["cache", "sequential"] = Field(
        "sequential",
        description="sequential: the paper's way (best quality); cache: from the `hessians` "
        "stage (fast sweeps)",
    )
    true_sequential: bool = Field(
        True, description="sequential mode: groups inside a block see earlier groups quantized"
    )
    batch_bytes: int = Field(
        128 * 2**20, gt=0, description="memory for solving same-shape layers together (cache)"
    )
    allocation: Literal["auto", "off"] = Field(
        "auto",
        description="auto: per-layer bits/group size from an upstream `search` stage when "
        "there is one (else `bits`/`group_size`); off: ignore any search",
    )

    @field_validator("shrink")
    @classmethod
    def _shrink(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not 0 < x <= 2 for x in v)):
            raise ValueError("shrink: give factors in (0, 2], e.g. [1, 0.9, 0.8]")
        return v

    def refit_rounds(self) -> int:
        if self.refit is not None:
            return self.refit
        return 1 if self.hessians == "sequential" else 0

    def shrink_for(self, spec: QuantSpec) -> tuple[float, ...]:
        if self.shrink is not None:
            return tuple(self.shrink)
        return (1.0, 0.9, 0.8, 0.7) if spec.group_size <= 0 else (1.0,)


def _split(res: GPTQResult, sizes: list[int]) -> list[QuantResult]:
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        out.append(
            QuantResult(res.weight[sl], res.codes[sl], res.scale[sl], res.zero[sl], res.g_idx)
        )
        start += n
    return out


def solve_batch(
    problems: list[tuple[dict[str, torch.nn.Module], torch.Tensor, int]],
    spec: QuantSpec,
    params: GPTQParams,
    keep: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, QuantResult], list[dict[str, Any]]]:
    """GPTQ for several problems of one shape and grid, solved as one batch.

    Each problem is (layers sharing one input, Σxxᵀ of that input, token count); the
    layers' rows are stacked (rows are independent given H).
    """
    t0 = time.perf_counter()
    ws = [
        [weight_matrix(m).detach().float().to(device) for m in layers.values()]
        for layers, _, _ in problems
    ]
    rows_per, cols = sum(x.shape[0] for x in ws[0]), ws[0][0].shape[1]
    # one buffer each for the stacked weights and Hessians, handed to the solver as
    # scratch space (it permutes them and turns H into its inverse factor in place)
    w = torch.empty(len(problems), rows_per, cols, device=device)
    h = torch.empty(len(problems), cols, cols, device=device)
    for k, ((_, s, n), wl) in enumerate(zip(problems, ws, strict=True)):
        torch.cat(wl, dim=0, out=w[k])
        h[k] = normalize(s.to(device), n)
    mask = None
    if keep is not None:
        mask = torch.stack(
            [torch.cat([keep[n].to(device) for n in layers], dim=0) for layers, _, _ in problems]
        )
    results = gptq_refit_batch(
        w,
        h,
        spec,
        rounds=params.refit_rounds(),
        shrink=params.shrink_for(spec),
        block_size=params.block_size,
        damp=params.damp,
        act_order=params.act_order,
        static_groups=params.static_groups,
        keep=mask,
        consume=True,
    )
    del w, h
    seconds = time.perf_counter() - t0
    out: dict[str, QuantResult] = {}
    rows: list[dict[str, Any]] = []
    total_rows = len(problems) * rows_per
    for (layers, raw, count), wl, res in zip(problems, ws, results, strict=True):
        parts = _split(res, [x.shape[0] for x in wl])
        trace = float((raw.diagonal() / max(count, 1)).sum())  # tr(H), H = Σxxᵀ / n
        h = None  # normalised only when the solver did not report the objectives
        start = 0
        for n, wi, qi in zip(layers, wl, parts, strict=True):
            sl = slice(start, start + wi.shape[0])
            start += wi.shape[0]
            if res.row_objective is not None and res.rtn_row_objective is not None:
                g_err = float(res.row_objective[sl].sum())
                r_err = float(res.rtn_row_objective[sl].sum())
            else:
                if h is None:
                    h = normalize(raw.to(device), count)
                g_err, r_err = _objectives(wi, qi, h, spec, None if keep is None else keep[n])
            out[n] = qi
            rows.append(
                {
                    "layer": n,
                    "shape": list(wi.shape),
                    "bits": spec.bits,
                    "group_size": spec.group_size,
                    "sym": spec.sym,
                    "h_trace": trace,
                    "tokens": count,
                    "gptq_loss": g_err,
                    "rtn_loss": r_err,
                    "ratio": g_err / r_err if r_err > 0 else (1.0 if g_err == 0 else math.inf),
                    "damp": res.damp,
                    "retries": res.retries,
                    "fallback": res.fallback,
                    "dead": res.dead,
                    "seconds": seconds * wi.shape[0] / total_rows,
                }
            )
    return out, rows


def _objectives(
    w: torch.Tensor,
    res: QuantResult,
    h: torch.Tensor,
    spec: QuantSpec,
    keep: torch.Tensor | None,
) -> tuple[float, float]:
    """GPTQ's and RTN's layer objectives; RTN on the solver's grid when it was fitted
    before the sweep (static groups or per channel)."""
    static = torch.equal(
        res.g_idx.long(), torch.arange(w.shape[1], device=w.device) // spec.group_cols(w.shape[1])
    )
    grid = (res.scale, res.zero, res.g_idx) if static else None
    g, r = objectives(w, res.weight, h, spec, grid, keep)
    return float(g.sum()), float(r.sum())


def _batches(items: list[Any], per_item_bytes: int, budget: int) -> list[list[Any]]:
    """As few batches as fit the budget, of near-equal sizes."""
    most = max(1, budget // max(per_item_bytes, 1))
    n = math.ceil(len(items) / math.ceil(len(items) / most)) if items else 1
    return [items[i : i + n] for i in range(0, len(items), n)]


SpecOf = Callable[[str], QuantSpec | None]


def _bucket(
    names: list[str], key_of: dict[str, str], spec_of: SpecOf
) -> dict[tuple[str, QuantSpec], list[str]]:
    groups: dict[tuple[str, QuantSpec], list[str]] = defaultdict(list)
    for n in names:
        spec = spec_of(n)
        if spec is not None:
            groups[(key_of[n], spec)].append(n)
    return groups


def solve_cached(
    layers: dict[str, torch.nn.Module],
    hs: HessianStore,
    spec_of: SpecOf,
    params: GPTQParams,
    on_solved: Callable[[dict[str, QuantResult], list[dict[str, Any]], QuantSpec], None],
    *,
    keep: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    bar: Any = None,
) -> None:
    """Solve every layer from the Hessian cache; layers of one shape and grid are solved
    together across blocks. `on_solved(results, rows, spec)` receives each batch."""
    key_of = {n: hs.input_key(n) for n in layers}
    shapes: dict[tuple[Any, ...], list[list[str]]] = defaultdict(list)
    for (_key, spec), names in _bucket(list(layers), key_of, spec_of).items():
        out_rows = sum(weight_matrix(layers[x]).shape[0] for x in names)
        cols = weight_matrix(layers[names[0]]).shape[1]
        shapes[(spec, out_rows, cols)].append(names)
    jobs = []
    for (spec, r, c), probs in shapes.items():
        per = 4 * (3 * r * c + 3 * c * c)  # W, its result, codes; raw and scratch H
        if params.refit_rounds():  # + the originals, W·H and the stacked candidate rows
            per = 4 * (3 * c * c + r * c * (4 + 2 * len(params.shrink_for(spec))))
        jobs += [(spec, chunk) for chunk in _batches(probs, per, params.batch_bytes)]
    for spec, chunk in jobs:
        problems = []
        for names in chunk:
            s, n = hs.get(names[0])
            problems.append(({x: layers[x] for x in names}, s, n))
        results, rows = solve_batch(problems, spec, params, keep, device)
        on_solved(results, rows, spec)
        del problems, results
        release(collect=False)
        if bar is not None:
            bar.advance(len(rows))


def allocation_spec_of(ctx: Any, params: GPTQParams) -> tuple[SpecOf, dict[str, Any] | None]:
    """The grid of each layer: params' grid, with bits/group size from an upstream
    `search` stage's allocation when `allocation` is auto and there is one."""
    rec = ctx.find("search") if params.allocation == "auto" else None
    if rec is None:
        return params.spec_for, None
    alloc = read_json(rec.dir / "allocation.json")
    chosen = alloc["layers"]

    def spec_of(name: str) -> QuantSpec | None:
        base = params.spec_for(name)
        if base is None or name not in chosen:
            return base
        c = chosen[name]
        gs = int(c["group_size"])
        return replace(base, bits=int(c["bits"]), group_size=gs, mse=params.clip_search(gs))

    return spec_of, alloc


def _report(ctx: Any, rows: list[dict[str, Any]]) -> None:
    retried = [r for r in rows if r["retries"] > 0 or r["fallback"]]
    for r in retried:
        what = (
            "rounded to nearest (no damping worked)"
            if r["fallback"]
            else (f"damping raised to λ={r['damp']:g} after {r['retries']} Cholesky failure(s)")
        )
        ctx.console.print(f"  [yellow]{r['layer']}: {what}[/]")


@register_stage(
    "gptq",
    GPTQParams,
    help="GPTQ quantization (Hessian cache or sequential)",
    modifies_weights=True,
)
def run(ctx: Any, params: GPTQParams) -> dict[str, Any]:
    model = ctx.model()
    store = QuantStore(ctx.out_dir)
    rows: list[dict[str, Any]] = []
    keep = None
    if ctx.find("prune") is not None:  # joint sparsity: pruned weights stay zero
        keep = {n: weight_matrix(m).detach() != 0 for n, m in target_layers(model).items()}
    t_all = time.perf_counter()
    spec_of, alloc = allocation_spec_of(ctx, params)
    if alloc is not None:
        ctx.console.print(
            f"  per-layer bits from the search: {alloc['avg_bits']:.3f} average bits, "
            f"{alloc['total_bytes']} bytes"
        )

    if params.hessians == "cache":
        hs = HessianStore(ctx.require("hessians").dir)
        layers = target_layers(model)

        def commit(
            results: dict[str, QuantResult], r: list[dict[str, Any]], spec: QuantSpec
        ) -> None:
            _commit(ctx, layers, results, store, spec)
            rows.extend(r)

        with ctx.progress("gptq: solving", len(layers)) as bar:
            solve_cached(layers, hs, spec_of, params, commit, keep=keep, device=ctx.device, bar=bar)
    else:
        rows = _sequential(ctx, model, params, spec_of, store, keep)
    store.save()
    write_json(ctx.out_dir / "layers.json", rows)
    _report(ctx, rows)
    g = sum(r["gptq_loss"] for r in rows)
    rt = sum(r["rtn_loss"] for r in rows)
    return {
        "layers": len(rows),
        "bits": params.bits if alloc is None else "mixed",
        "group_size": params.group_size if alloc is None else "mixed",
        "avg_bits": _avg_bits(rows),
        "sym": params.sym,
        "act_order": params.act_order,
        "hessians": params.hessians,
        "gptq_loss": g,
        "rtn_loss": rt,
        "ratio": g / rt if rt > 0 else None,
        "retried_layers": sum(1 for r in rows if r["retries"] > 0),
        "fallback_layers": sum(1 for r in rows if r["fallback"]),
        "solve_seconds": round(time.perf_counter() - t_all, 3),
    }


def _sequential(
    ctx: Any,
    model: torch.nn.Module,
    params: GPTQParams,
    spec_of: SpecOf,
    store: QuantStore,
    keep: dict[str, torch.Tensor] | None,
) -> list[dict[str, Any]]:
    """The paper's procedure: block by block on the outputs of the quantized blocks
    before, each group of layers on the quantized groups before it (true-sequential)."""
    rows: list[dict[str, Any]] = []

    def solve(runner: Any, group: list[str], acc: SharedInputAccumulator) -> None:
        for (key, spec), names in _bucket(group, acc.alias, spec_of).items():
            hsum = acc.sums[key]
            problem = ({x: runner.layers[x] for x in names}, hsum.sum, hsum.count)
            results, r = solve_batch([problem], spec, params, keep, ctx.device)
            _commit(ctx, runner.layers, results, store, spec)
            rows.extend(r)

    nblocks = len(find_blocks(model)[1])
    with ctx.progress("gptq: blocks (sequential)", nblocks) as bar:
        sequential_groups(
            model,
            ctx.calibration_tokens(),
            device=ctx.device,
            batch_size=ctx.recipe.calibration.batch_size,
            wanted=lambda n: spec_of(n) is not None,
            solve=solve,
            true_sequential=params.true_sequential,
            on_block=lambda _done, _total: bar.advance(),
        )
    return rows


def _avg_bits(rows: list[dict[str, Any]]) -> float | None:
    n = sum(r["shape"][0] * r["shape"][1] for r in rows)
    return sum(r["bits"] * r["shape"][0] * r["shape"][1] for r in rows) / n if n else None


def _commit(
    ctx: Any,
    layers: dict[str, torch.nn.Module],
    results: dict[str, QuantResult],
    store: QuantStore,
    spec: QuantSpec,
) -> None:
    new = {}
    for name, res in results.items():
        mod = layers[name]
        new[f"{name}.weight"] = param_layout(mod, res.weight.to(mod.weight.dtype).cpu())
        store.add(name, res, spec)
    ctx.set_weights(new)
