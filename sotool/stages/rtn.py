"""`rtn`: round-to-nearest quantization, the baseline every second-order method must beat.

Recipe::

    - rtn: {bits: 4, group_size: 64, sym: true}
"""

from __future__ import annotations

import time
from typing import Any

from sotool.algos.gptq import layer_error
from sotool.algos.hessian import normalize
from sotool.algos.quant import rtn
from sotool.models.blocks import weight_matrix
from sotool.registry import register_stage
from sotool.rundir import write_json
from sotool.stages._quant import QuantParams, QuantStore, param_layout, target_layers
from sotool.stages.hessians import HessianStore


class RTNParams(QuantParams):
    """Round-to-nearest on a uniform grid (min/max per group)."""


@register_stage(
    "rtn", RTNParams, help="round-to-nearest quantization (baseline)", modifies_weights=True
)
def run(ctx: Any, params: RTNParams) -> dict[str, Any]:
    model = ctx.model()
    layers = target_layers(model)
    hrec = ctx.find("hessians")
    hstore = HessianStore(hrec.dir) if hrec is not None else None
    store = QuantStore(ctx.out_dir)
    rows: list[dict[str, Any]] = []
    with ctx.progress("rtn layers", len(layers)) as bar:
        for name, mod in layers.items():
            spec = params.spec_for(name)
            bar.advance()
            if spec is None:
                continue
            t0 = time.perf_counter()
            w = weight_matrix(mod).detach().float()
            res = rtn(w, spec)
            row: dict[str, Any] = {
                "layer": name,
                "shape": list(w.shape),
                "bits": spec.bits,
                "group_size": spec.group_size,
                "sym": spec.sym,
                "weight_mse": float((res.weight - w).pow(2).mean()),
            }
            if hstore is not None and name in hstore:
                s, n = hstore.get(name)
                h = normalize(s, n)
                row["rtn_loss"] = layer_error(w, res.weight, h)
                row["h_trace"] = float(h.diagonal().sum())
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            ctx.set_weights({f"{name}.weight": param_layout(mod, res.weight.to(mod.weight.dtype))})
            store.add(name, res, spec)
    store.save()
    write_json(ctx.out_dir / "layers.json", rows)
    return {
        "layers": len(rows),
        "bits": params.bits,
        "group_size": params.group_size,
        "sym": params.sym,
    }
