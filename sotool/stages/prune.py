"""`prune`: SparseGPT (OBS with the layer-wise Hessian), oBERT (OBS with the
block-diagonal empirical Fisher) or magnitude pruning.

Recipe::

    - calibrate: {}
    - hessians: {}
    - prune: {method: sparsegpt, sparsity: 0.5, pattern: unstructured}   # or "2:4", "block4"
    - gptq: {bits: 4, group_size: 64}    # optional: quantizes the survivors, zeros stay zero

    - fisher: {samples: 32}
    - prune: {method: obert, sparsity: 0.5, pattern: block4, allocation: global}

The magnitude baseline needs no calibration. Every layer's report carries the OBS
objective and the magnitude baseline's objective at the same pattern and budget: the
layer-wise Hessian objective ‖(W−Ŵ)X‖²/n for sparsegpt and magnitude (when a `hessians`
stage is there), the block-diagonal Fisher objective ½δwᵀFδw for obert. Only the layers
inside the transformer blocks are pruned, so neither lm_head nor the input embeddings
(tied to it or not) ever change. `allocation: global` ranks OBS saliencies of every
layer against each other (obert: its block-Fisher saliencies; magnitude: w²/(2[F⁻¹]_jj)
with the layer's full Fisher inverse diagonal from M-FAC) and gives each layer the
sparsity one global threshold selects, at the same total.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from sotool.algos.gptq import layer_error
from sotool.algos.hessian import normalize
from sotool.algos.obs import (
    allocate_sparsity,
    block_fisher_inverse,
    check_layout,
    fisher_damp,
    fisher_loss,
    mfac_saliency,
    obert_prune,
    obert_saliency,
)
from sotool.algos.prune import Pattern, PruneResult, magnitude_prune, sparsegpt, sparsegpt_batch
from sotool.errors import SotoolError
from sotool.memory import release
from sotool.models.blocks import find_blocks, weight_matrix
from sotool.recipe import Strict
from sotool.registry import register_stage
from sotool.rundir import write_json
from sotool.stages._quant import check_regexes, param_layout, target_layers
from sotool.stages.fisher import FisherStore
from sotool.stages.hessians import HessianStore, sequential_groups
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

    method: Literal["sparsegpt", "magnitude", "obert"] = Field(
        "sparsegpt",
        description="sparsegpt: OBS with the layer Hessians; obert: OBS with the block "
        "Fisher from a `fisher` stage; magnitude: |w|",
    )
    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of weights removed")
    pattern: str = Field(
        "unstructured", description="'unstructured', 'N:M' (e.g. '2:4') or 'blockK' ('block4')"
    )
    block_size: int = Field(128, gt=0, description="sparsegpt: columns per mask-selection block")
    damp: float = Field(
        0.01, gt=0, description="relative damping λ·mean(diag) of the Hessian or the Fisher"
    )
    hessians: Literal["cache", "sequential"] = Field(
        "sequential",
        description="sparsegpt: re-collected block by block on the already pruned model "
        "(the gptq stage's default; best perplexity), or from a `hessians` stage (cache: "
        "half the time, for sweeps)",
    )
    fisher_block: int = Field(
        32, gt=0, description="obert: B, weights per block of the block-diagonal Fisher"
    )
    batch_bytes: int = Field(
        256 * 2**20,
        gt=0,
        description="sparsegpt from the cache: memory for solving same-shape layers together",
    )
    allocation: Literal["uniform", "global"] = Field(
        "uniform",
        description="uniform: every layer at `sparsity`; global: one saliency threshold "
        "across layers (obert, magnitude; needs a `fisher` stage)",
    )
    max_layer_sparsity: float = Field(
        0.95, gt=0, lt=1, description="global allocation: the most any layer loses"
    )
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

    @model_validator(mode="after")
    def _combination(self) -> PruneParams:
        pat = Pattern.parse(self.pattern, self.sparsity)
        if self.allocation == "global":
            if self.method == "sparsegpt":
                raise ValueError(
                    "allocation: global ranks Fisher saliencies; use method obert or magnitude"
                )
            if pat.kind == "nm":
                raise ValueError("allocation: global needs an unstructured or blockK pattern")
            if any(o.sparsity is not None for o in self.overrides):
                raise ValueError("overrides: per-layer sparsity conflicts with allocation: global")
        if pat.kind == "block" and self.method == "obert" and self.fisher_block % pat.size:
            raise ValueError(
                f"fisher_block: {self.fisher_block} must be a multiple of the group size "
                f"{pat.size} of pattern {self.pattern!r}"
            )
        return self

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


def global_patterns(
    params: PruneParams, layers: dict[str, torch.nn.Module], fisher: FisherStore, bar: Any
) -> dict[str, Pattern]:
    """Per-layer patterns at the sparsity one global saliency threshold selects."""
    base = {n: params.pattern_for(n) for n in layers}
    scores: dict[str, torch.Tensor] = {}
    for name, pat in base.items():
        bar.advance()
        if pat is None:
            continue
        w = weight_matrix(layers[name]).detach().float()
        g = fisher.get(name)
        if params.method == "obert":
            check_layout(tuple(w.shape), pat, params.fisher_block)
            finv = block_fisher_inverse(g, params.fisher_block, fisher_damp(g, params.damp))
            s = obert_saliency(w, finv, pat, params.fisher_block)
        else:
            s = mfac_saliency(w, g, params.damp)
        if pat.kind == "block":  # units are groups of K weights
            s = s[:, : s.shape[1] // pat.size * pat.size].reshape(s.shape[0], -1, pat.size).sum(-1)
        scores[name] = s
    alloc = allocate_sparsity(scores, params.sparsity, params.max_layer_sparsity)
    return {n: Pattern.parse(params.pattern, alloc[n]) for n in scores}


def sparsegpt_cached(
    layers: dict[str, torch.nn.Module],
    patterns: dict[str, Pattern | None],
    hs: HessianStore,
    params: PruneParams,
    device: torch.device | str,
) -> Iterator[tuple[str, torch.Tensor, tuple[PruneResult, float]]]:
    """SparseGPT from the Hessian cache, layers of one shape and pattern solved together
    across blocks: yields (name, H, (result, seconds)) per layer."""
    groups: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for n, pat in patterns.items():
        if pat is not None:
            groups[(tuple(weight_matrix(layers[n]).shape), pat)].append(n)
    for ((r, c), pat), names in groups.items():
        per = 4 * (3 * r * c + 3 * c * c)  # W, result, mask; H and its inverse factor
        most = max(1, params.batch_bytes // per)
        size = math.ceil(len(names) / math.ceil(len(names) / most))
        for i in range(0, len(names), size):
            chunk = names[i : i + size]
            t0 = time.perf_counter()
            raw: dict[str, torch.Tensor] = {}
            for n in chunk:  # layers reading one input share its Hessian
                key = hs.input_key(n)
                if key not in raw:
                    raw[key] = normalize(*hs.get(n)).to(device)
            w = torch.stack([weight_matrix(layers[n]).detach().float().to(device) for n in chunk])
            h = torch.stack([raw[hs.input_key(n)] for n in chunk])
            results = sparsegpt_batch(
                w, h, pat, block_size=params.block_size, damp=params.damp, consume=True
            )
            share = (time.perf_counter() - t0) / len(chunk)
            for n, res in zip(chunk, results, strict=True):
                yield n, raw[hs.input_key(n)], (res, share)
            del w, h, results, raw
            release(collect=False)


def prune_layer(
    name: str,
    mod: torch.nn.Module,
    pat: Pattern,
    params: PruneParams,
    h: torch.Tensor | None,
    grads: torch.Tensor | None,
    device: torch.device,
    solved: tuple[PruneResult, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(new weight (R, C), mask (R, C), report row) for one layer; `solved` is a
    SparseGPT result already computed with other layers (and its share of the time)."""
    t0 = time.perf_counter()
    w = weight_matrix(mod).detach().float()
    mag_mask = magnitude_prune(w, pat)
    mag_w = w.masked_fill(mag_mask, 0)
    row: dict[str, Any] = {
        "layer": name,
        "shape": list(w.shape),
        "pattern": params.pattern,
        "target_sparsity": pat.sparsity,
    }
    lam = None
    if params.method == "sparsegpt":
        assert h is not None
        if solved is None:
            res = sparsegpt(w.to(device), h, pat, block_size=params.block_size, damp=params.damp)
        else:
            res, spent = solved
            t0 -= spent
        w_new, mask = res.weight.cpu(), res.mask.cpu()
        row.update(damp=res.damp, retries=res.retries)
    elif params.method == "obert":
        assert grads is not None
        ob = obert_prune(w, grads, pat, block=params.fisher_block, damp=params.damp)
        w_new, mask, lam = ob.weight, ob.mask, ob.lam
    else:
        w_new, mask = mag_w, mag_mask
    if params.method == "obert" or (h is None and grads is not None):
        assert grads is not None
        lam = lam if lam is not None else fisher_damp(grads, params.damp)
        row["objective"] = "fisher"
        row["obs_loss"] = fisher_loss(w_new - w, grads, lam, params.fisher_block)
        row["magnitude_loss"] = fisher_loss(mag_w - w, grads, lam, params.fisher_block)
    elif h is not None:
        row["objective"] = "hessian"
        row["obs_loss"] = layer_error(w, w_new, h.cpu())
        row["magnitude_loss"] = layer_error(w, mag_w, h.cpu())
        row["h_trace"] = float(h.diagonal().sum())
    if "obs_loss" in row:
        m = row["magnitude_loss"]
        row["ratio"] = row["obs_loss"] / m if m > 0 else None
    row["sparsity"] = float(mask.float().mean())
    row["seconds"] = time.perf_counter() - t0
    return w_new, mask, row


@register_stage(
    "prune",
    PruneParams,
    help="SparseGPT / oBERT / magnitude pruning (unstructured, N:M, blocks)",
    version="2",
    modifies_weights=True,
)
def run(ctx: Any, params: PruneParams) -> dict[str, Any]:
    model = ctx.model()
    layers = target_layers(model)
    sequential = params.method == "sparsegpt" and params.hessians == "sequential"
    hs = None
    if (params.method == "sparsegpt" and not sequential) or ctx.find("hessians") is not None:
        hs = HessianStore(ctx.require("hessians").dir)
    fs = None
    if params.method == "obert" or params.allocation == "global":
        fs = FisherStore(ctx.require("fisher").dir)
        missing = [n for n in layers if n not in fs]
        if missing:
            raise SotoolError(f"prune: the fisher stage has no gradients for {missing[0]}")
    if params.allocation == "global":
        assert fs is not None
        with ctx.progress("prune: global saliencies", len(layers)) as bar:
            patterns: dict[str, Pattern | None] = dict(global_patterns(params, layers, fs, bar))
    else:
        patterns = {n: params.pattern_for(n) for n in layers}
    rows: list[dict[str, Any]] = []
    masks: dict[str, torch.Tensor] = {}

    def commit(
        name: str, h: torch.Tensor | None, solved: tuple[PruneResult, float] | None = None
    ) -> None:
        mod, pat = layers[name], patterns[name]
        assert pat is not None
        grads = fs.get(name) if fs is not None else None
        w_new, mask, row = prune_layer(name, mod, pat, params, h, grads, ctx.device, solved)
        rows.append(row)
        masks[name] = mask.to(torch.uint8).contiguous()
        ctx.set_weights({f"{name}.weight": param_layout(mod, w_new.to(mod.weight.dtype))})

    if sequential:
        nblocks = len(find_blocks(model)[1])
        with ctx.progress("prune: blocks (sequential)", nblocks) as bar:

            def solve(_runner: Any, group: list[str], acc: Any) -> None:
                for name in group:
                    s = acc.get(name)
                    commit(name, normalize(s.sum, s.count).to(ctx.device))

            sequential_groups(
                model,
                ctx.calibration_tokens(),
                device=ctx.device,
                batch_size=ctx.recipe.calibration.batch_size,
                wanted=lambda n: patterns.get(n) is not None,
                solve=solve,
                on_block=lambda _done, _total: bar.advance(),
            )
    elif params.method == "sparsegpt":
        assert hs is not None
        with ctx.progress("prune (sparsegpt, cached Hessians)", len(layers)) as bar:
            for name, h, solved in sparsegpt_cached(layers, patterns, hs, params, ctx.device):
                commit(name, h, solved)
                bar.advance()
    else:
        with ctx.progress(f"prune ({params.method})", len(layers)) as bar:
            for name in layers:
                bar.advance()
                if patterns[name] is None:
                    continue
                h = normalize(*hs.get(name)).to(ctx.device) if hs is not None else None
                commit(name, h)
    save_shards(masks, ctx.out_dir, "masks")
    write_json(ctx.out_dir / "layers.json", rows)
    total = sum(weight_matrix(m).numel() for m in layers.values())
    pruned = sum(int(m.sum()) for m in masks.values())
    out: dict[str, Any] = {
        "method": params.method,
        "pattern": params.pattern,
        "allocation": params.allocation,
        "layers": len(rows),
        "sparsity": pruned / max(total, 1),
        "target_sparsity": Pattern.parse(params.pattern, params.sparsity).sparsity,
    }
    if rows and "obs_loss" in rows[0]:
        o = sum(r["obs_loss"] for r in rows)
        m = sum(r["magnitude_loss"] for r in rows)
        out.update(
            objective=rows[0]["objective"], obs_loss=o, magnitude_loss=m, ratio=o / m if m else None
        )
    ctx.console.print(f"  {out['sparsity']:.1%} of block weights pruned ({params.pattern})")
    return out
