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
from typing import Any, Literal

import torch
from pydantic import Field

from sotool.algos.gptq import GPTQResult, gptq_batch, layer_error
from sotool.algos.hessian import normalize
from sotool.algos.quant import QuantResult, QuantSpec, rtn
from sotool.memory import release
from sotool.models.blocks import find_blocks, weight_matrix
from sotool.registry import register_stage
from sotool.rundir import write_json
from sotool.stages._quant import QuantParams, QuantStore, param_layout, target_layers
from sotool.stages.hessians import HessianStore, sequential_groups


class GPTQParams(QuantParams):
    """GPTQ with the layer-wise Hessian XXᵀ/n."""

    act_order: bool = Field(True, description="quantize columns by descending Hessian diagonal")
    static_groups: bool = Field(
        True, description="fit group grids before the sweep (g_idx = i // group_size)"
    )
    clip: Literal["minmax", "mse"] = Field(
        "mse", description="grid range: plain min/max, or the MSE-best shrunk range"
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
        160 * 2**20, gt=0, description="memory for solving same-shape layers together (cache)"
    )


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
    hs = [normalize(s.to(device), n) for _, s, n in problems]
    ws = [
        [weight_matrix(m).detach().float().to(device) for m in layers.values()]
        for layers, _, _ in problems
    ]
    w = torch.stack([torch.cat(x, dim=0) for x in ws])
    mask = None
    if keep is not None:
        mask = torch.stack(
            [torch.cat([keep[n].to(device) for n in layers], dim=0) for layers, _, _ in problems]
        )
    results = gptq_batch(
        w,
        torch.stack(hs),
        spec,
        block_size=params.block_size,
        damp=params.damp,
        act_order=params.act_order,
        static_groups=params.static_groups,
        keep=mask,
    )
    seconds = time.perf_counter() - t0
    out: dict[str, QuantResult] = {}
    rows: list[dict[str, Any]] = []
    total_rows = w.shape[0] * w.shape[1]
    for (layers, _, count), h, wl, res in zip(problems, hs, ws, results, strict=True):
        parts = _split(res, [x.shape[0] for x in wl])
        trace = float(h.diagonal().sum())
        for n, wi, qi in zip(layers, wl, parts, strict=True):
            base = rtn(wi * keep[n].to(wi.device) if keep is not None else wi, spec)
            g_err = layer_error(wi, qi.weight, h)
            r_err = layer_error(wi, base.weight, h)
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


def _batches(items: list[Any], per_item_bytes: int, budget: int) -> list[list[Any]]:
    n = max(1, budget // max(per_item_bytes, 1))
    return [items[i : i + n] for i in range(0, len(items), n)]


def _bucket(
    names: list[str], key_of: dict[str, str], params: GPTQParams
) -> dict[tuple[str, QuantSpec], list[str]]:
    groups: dict[tuple[str, QuantSpec], list[str]] = defaultdict(list)
    for n in names:
        spec = params.spec_for(n)
        if spec is not None:
            groups[(key_of[n], spec)].append(n)
    return groups


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
    if params.hessians == "cache":
        hs = HessianStore(ctx.require("hessians").dir)
        layers = target_layers(model)
        key_of = {n: hs.input_key(n) for n in layers}
        # problems of one shape and grid are solved together, across blocks
        shapes: dict[tuple[Any, ...], list[list[str]]] = defaultdict(list)
        for (_key, spec), names in _bucket(list(layers), key_of, params).items():
            out_rows = sum(weight_matrix(layers[x]).shape[0] for x in names)
            cols = weight_matrix(layers[names[0]]).shape[1]
            shapes[(spec, out_rows, cols)].append(names)
        jobs = []
        for (spec, r, c), probs in shapes.items():
            per = 4 * (6 * r * c + 5 * c * c)  # W and its copies, codes; H, its copies, U
            jobs += [(spec, chunk) for chunk in _batches(probs, per, params.batch_bytes)]
        with ctx.progress("gptq: solving", len(layers)) as bar:
            for spec, chunk in jobs:
                problems = []
                for names in chunk:
                    s, n = hs.get(names[0])
                    problems.append(({x: layers[x] for x in names}, s, n))
                results, r = solve_batch(problems, spec, params, keep, ctx.device)
                _commit(ctx, layers, results, store, spec)
                del problems, results
                release(collect=False)
                rows += r
                bar.advance(len(r))
    else:
        tokens = ctx.calibration_tokens()
        nblocks = len(find_blocks(model)[1])
        with ctx.progress("gptq: blocks (sequential)", nblocks) as bar:
            for runner, group, acc in sequential_groups(
                model,
                tokens,
                device=ctx.device,
                batch_size=ctx.recipe.calibration.batch_size,
                wanted=lambda n: params.spec_for(n) is not None,
                true_sequential=params.true_sequential,
                on_block=lambda _done, _total: bar.advance(),
            ):
                for (key, spec), names in _bucket(group, acc.alias, params).items():
                    hsum = acc.sums[key]
                    problem = ({x: runner.layers[x] for x in names}, hsum.sum, hsum.count)
                    results, r = solve_batch([problem], spec, params, keep, ctx.device)
                    _commit(ctx, runner.layers, results, store, spec)
                    rows += r
    store.save()
    write_json(ctx.out_dir / "layers.json", rows)
    _report(ctx, rows)
    g = sum(r["gptq_loss"] for r in rows)
    rt = sum(r["rtn_loss"] for r in rows)
    return {
        "layers": len(rows),
        "bits": params.bits,
        "group_size": params.group_size,
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
