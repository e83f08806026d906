"""`prune`: SparseGPT (OBS with the layer-wise Hessian) or magnitude pruning.

Recipe::

    - calibrate: {}
    - hessians: {}
    - prune: {method: sparsegpt, sparsity: 0.5, pattern: unstructured}   # or "2:4", "block4"
    - gptq: {bits: 4, group_size: 64}    # optional: quantizes the survivors, zeros stay zero

The magnitude baseline needs no calibration. Every layer's report carries the OBS
objective and the magnitude baseline's objective at the same pattern and budget.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from sotool.algos.gptq import layer_error
from sotool.algos.hessian import normalize
from sotool.algos.prune import Pattern, magnitude_prune, sparsegpt
from sotool.models.blocks import weight_matrix
from sotool.recipe import Strict
from sotool.registry import register_stage
from sotool.rundir import write_json
from sotool.stages._quant import check_regexes, param_layout, target_layers
from sotool.stages.hessians import HessianStore
from sotool.tensorio import save_shards


class SparsityOverride(Strict):
    """Per-layer sparsity for layers whose name matches `pattern` (a regex)."""

    pattern: str
    sparsity: float | None = Field(None, ge=0, lt=1)
    skip: bool = False

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        return check_regexes([v])[0]


class PruneParams(Strict):
    """One-shot pruning of every block layer."""

    method: Literal["sparsegpt", "magnitude"] = Field(
        "sparsegpt", description="sparsegpt: OBS with the cached Hessians; magnitude: |w|"
    )
    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of weights removed")
    pattern: str = Field(
        "unstructured", description="'unstructured', 'N:M' (e.g. '2:4') or 'blockK' ('block4')"
    )
    block_size: int = Field(128, gt=0, description="columns per mask-selection block")
    damp: float = Field(0.01, ge=0, description="relative damping λ")
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"], description="regexes of layers to leave dense"
    )
    overrides: list[SparsityOverride] = Field(
        default_factory=list, description="per-layer sparsity by regex"
    )

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        Pattern.parse(v, 0.5)
        return v

    @field_validator("ignore")
    @classmethod
    def _ignore(cls, v: list[str]) -> list[str]:
        return check_regexes(v)

    def pattern_for(self, name: str) -> Pattern | None:
        if any(re.search(p, name) for p in self.ignore):
            return None
        sp = self.sparsity
        for o in self.overrides:
            if re.search(o.pattern, name):
                if o.skip:
                    return None
                sp = o.sparsity if o.sparsity is not None else sp
        return Pattern.parse(self.pattern, sp)


@register_stage(
    "prune",
    PruneParams,
    help="SparseGPT / magnitude pruning (unstructured, N:M, blocks)",
    modifies_weights=True,
)
def run(ctx: Any, params: PruneParams) -> dict[str, Any]:
    model = ctx.model()
    layers = target_layers(model)
    hs = None
    if params.method == "sparsegpt" or ctx.find("hessians") is not None:
        hs = HessianStore(ctx.require("hessians").dir)
    rows: list[dict[str, Any]] = []
    masks: dict[str, torch.Tensor] = {}
    pruned = total = 0
    with ctx.progress(f"prune ({params.method})", len(layers)) as bar:
        for name, mod in layers.items():
            bar.advance()
            pat = params.pattern_for(name)
            w = weight_matrix(mod).detach().float()
            total += w.numel()
            if pat is None:
                continue
            t0 = time.perf_counter()
            h = normalize(*hs.get(name)).to(ctx.device) if hs is not None else None
            mag_mask = magnitude_prune(w, pat)
            mag_w = w.masked_fill(mag_mask, 0)
            row: dict[str, Any] = {"layer": name, "shape": list(w.shape), "pattern": params.pattern}
            if params.method == "sparsegpt":
                res = sparsegpt(
                    w.to(ctx.device), h, pat, block_size=params.block_size, damp=params.damp
                )
                w_new, mask = res.weight.cpu(), res.mask.cpu()
                row.update(damp=res.damp, retries=res.retries)
            else:
                w_new, mask = mag_w, mag_mask
            if h is not None:
                row["obs_loss"] = layer_error(w, w_new, h.cpu())
                row["magnitude_loss"] = layer_error(w, mag_w, h.cpu())
                row["ratio"] = (
                    row["obs_loss"] / row["magnitude_loss"] if row["magnitude_loss"] > 0 else None
                )
                row["h_trace"] = float(h.diagonal().sum())
            row["sparsity"] = float(mask.float().mean())
            row["seconds"] = time.perf_counter() - t0
            pruned += int(mask.sum())
            rows.append(row)
            masks[name] = mask.to(torch.uint8).contiguous()
            ctx.set_weights({f"{name}.weight": param_layout(mod, w_new.to(mod.weight.dtype))})
    save_shards(masks, ctx.out_dir, "masks")
    write_json(ctx.out_dir / "layers.json", rows)
    out = {
        "method": params.method,
        "pattern": params.pattern,
        "layers": len(rows),
        "sparsity": pruned / max(total, 1),
        "target_sparsity": Pattern.parse(params.pattern, params.sparsity).sparsity,
    }
    if rows and "obs_loss" in rows[0]:
        o = sum(r["obs_loss"] for r in rows)
        m = sum(r["magnitude_loss"] for r in rows)
        out.update(obs_loss=o, magnitude_loss=m, ratio=o / m if m else None)
    ctx.console.print(f"  {out['sparsity']:.1%} of block weights pruned ({params.pattern})")
    return out
