"""`export`: write the compressed model where other tools load it.

Recipe::

    - export: {format: dense}                   # a Hugging Face directory, safetensors
    - export: {format: compressed-tensors}      # pack-quantized: transformers, vLLM
    - export: {format: gptq}                    # GPTQ v1: GPTQModel, transformers, vLLM
    - export: {format: dense, dtype: float16, path: out/my-model}

`compressed-tensors` and `gptq` need a quantizing stage (`gptq` or `rtn`) upstream and
write its integer codes as is; layers it left alone, embeddings and norms stay dense.
Per-layer grids become several config groups (`mixed-precision`) or GPTQ `dynamic`
overrides; an upstream `prune` stage is recorded as the `sparsity_config`.

The model lands in the stage folder (`RUN/stages/export-*/model`), `RUN/model` points
to it, and with `path` it is also copied there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field

from sotool import __version__
from sotool.checkpoints import (
    QuantLayer,
    SparsityInfo,
    check_export,
    compressed_tensors_config,
    dense_bytes,
    gptq_config,
    load_quant,
    write_checkpoint,
)
from sotool.errors import SotoolError
from sotool.recipe import Strict
from sotool.registry import register_stage
from sotool.rundir import read_json, write_json

QUANTIZERS = ("gptq", "rtn")


class ExportParams(Strict):
    """Where and how to write the model."""

    format: Literal["dense", "compressed-tensors", "gptq"] = Field(
        "dense",
        description="dense: HF safetensors; compressed-tensors: pack-quantized "
        "(transformers, vLLM); gptq: GPTQ checkpoint (GPTQModel, transformers, vLLM)",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="dtype of dense tensors and scales (auto: the model's for dense, "
        "float16 for quantized formats; gptq scales are always float16)",
    )
    checkpoint_format: Literal["gptq", "gptq_v2"] = Field(
        "gptq", description="gptq only: v1 stores zero−1 (most readers), v2 stores zero"
    )
    path: str | None = Field(None, description="also copy the export to this directory")

    def torch_dtype(self, model: torch.nn.Module) -> torch.dtype:
        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        return next(model.parameters()).dtype if self.format == "dense" else torch.float16


def upstream_summary(ctx: Any) -> list[dict[str, Any]]:
    return [
        {"stage": r.name, "key": r.key[:16], "summary": r.meta.get("summary", {})}
        for r in ctx.upstream
    ]


def quant_source(ctx: Any, fmt: str) -> Any:
    """The latest quantizing stage, checked to be the last one that changed weights."""
    recs = [r for r in ctx.upstream if r.name in QUANTIZERS]
    if not recs:
        raise SotoolError(
            f"export: format {fmt} needs a quantizing stage before it; add '- gptq: {{}}' "
            "(or rtn) earlier in the recipe, or use format: dense"
        )
    rec = recs[-1]
    later = ctx.upstream[ctx.upstream.index(rec) + 1 :]
    changed = [r.name for r in later if r.modifies_weights]
    if changed:
        raise SotoolError(
            f"export: stage {changed[0]!r} changed the weights after {rec.name!r} quantized "
            f"them; move {rec.name!r} after it, or use format: dense"
        )
    return rec


def sparsity_of(ctx: Any) -> SparsityInfo | None:
    rec = ctx.find("prune")
    if rec is None:
        return None
    rows = read_json(rec.dir / "layers.json")
    return SparsityInfo(
        structure=rec.meta["params"]["pattern"],
        sparsity=float(rec.meta["summary"]["sparsity"]),
        layers=[r["layer"] for r in rows],
    )


def perplexities(ctx: Any) -> list[dict[str, Any]]:
    """Every upstream `evaluate` result, with the stage it measured after."""
    out = []
    for i, r in enumerate(ctx.upstream):
        s = r.meta.get("summary", {})
        if r.name == "evaluate" and "ppl" in s:
            after = ctx.upstream[i - 1].name if i else "(original)"
            out.append({"after": after, **{k: s.get(k) for k in ("ppl", "original_ppl")}})
    return out


def model_card(ctx: Any, fmt: str, sizes: dict[str, Any], loader: str) -> str:
    lines = [
        f"# Compressed with sotool {__version__}",
        "",
        f"Base model: `{ctx.recipe.model}`. Format: `{fmt}`.",
        "",
        "## Load",
        "",
        "```python",
        loader,
        "```",
        "",
        "## Size",
        "",
        f"- weights on disk: {sizes['bytes']:,} bytes ({sizes['bytes'] / 2**20:.1f} MiB)",
        f"- the same model dense in float16: {sizes['dense_fp16_bytes']:,} bytes "
        f"({sizes['dense_fp16_bytes'] / 2**20:.1f} MiB)",
        f"- ratio: {sizes['ratio_to_fp16']:.3f}",
        "",
    ]
    ppl = perplexities(ctx)
    if ppl:
        lines += ["## Measured perplexity", "", "| after | ppl | original ppl |", "|---|---|---|"]
        for p in ppl:
            orig = f"{p['original_ppl']:.4f}" if p.get("original_ppl") is not None else "-"
            lines.append(f"| {p['after']} | {p['ppl']:.4f} | {orig} |")
        lines.append("")
    lines += ["## Stages", ""]
    for r in ctx.upstream:
        s = r.meta.get("summary", {})
        brief = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in s.items()
            if not isinstance(v, dict | list)
        )
        lines.append(f"- `{r.name}`: {brief}")
    lines += [
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(ctx.runner.loaded.resolved(), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


LOADERS = {
    "dense": "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained(PATH)",
    "compressed-tensors": "# pip install compressed-tensors\n"
    "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained(PATH)\n"
    "# vLLM: vllm serve PATH",
    "gptq": "# pip install gptqmodel optimum\n"
    "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained(PATH)\n"
    "# vLLM: vllm serve PATH",
}


def quantized_config(
    ctx: Any, params: ExportParams, model: torch.nn.Module, layers: dict[str, QuantLayer], qrec: Any
) -> dict[str, Any]:
    qp = qrec.meta.get("params", {})
    if params.format == "compressed-tensors":
        return compressed_tensors_config(
            model, layers, bool(qp.get("act_order", False)), sparsity_of(ctx)
        )
    meta = {
        "method": qrec.name,
        "damp_percent": qp.get("damp"),
        "act_order": qp.get("act_order", False),
        "static_groups": qp.get("static_groups", False),
        "clip": qp.get("clip"),
    }
    return gptq_config(model, layers, params.checkpoint_format == "gptq", meta)


@register_stage(
    "export", ExportParams, help="write the model: dense, compressed-tensors or gptq", version="2"
)
def run(ctx: Any, params: ExportParams) -> dict[str, Any]:
    model = ctx.model()
    out = ctx.out_dir / "model"
    dtype = params.torch_dtype(model)
    layers: dict[str, QuantLayer] = {}
    qconfig = None
    v1 = params.checkpoint_format == "gptq"
    if params.format != "dense":
        qrec = quant_source(ctx, params.format)
        layers = load_quant(qrec.dir)
        for w in check_export(model, layers, params.format, v1):
            ctx.console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
        qconfig = quantized_config(ctx, params, model, layers, qrec)
    size = write_checkpoint(model, ctx.tokenizer(), out, params.format, dtype, layers, qconfig, v1)
    dense = dense_bytes(model)
    sizes = {"bytes": size, "dense_fp16_bytes": dense, "ratio_to_fp16": size / dense}
    (out / "sotool_recipe.yaml").write_text(
        yaml.safe_dump(ctx.runner.loaded.resolved(), sort_keys=False)
    )
    write_json(
        out / "sotool_summary.json",
        {
            "version": __version__,
            "format": params.format,
            "sizes": sizes,
            "perplexity": perplexities(ctx),
            "stages": upstream_summary(ctx),
        },
    )
    (out / "README.md").write_text(model_card(ctx, params.format, sizes, LOADERS[params.format]))
    final = ctx.runner.rundir.stage_dir("export", ctx.key) / "model"
    link = ctx.runner.rundir.root / "model"
    tmp_link = link.with_name(".model.tmp")
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(os.path.relpath(final, link.parent), tmp_link)
    os.replace(tmp_link, link)
    if params.path:
        dest = Path(params.path)
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out, tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    info = {
        "format": params.format,
        "dir": str(final),
        **sizes,
        "quantized_layers": len(layers),
    }
    ctx.console.print(
        f"  exported {params.format} model: {size / 2**20:.1f} MiB "
        f"({sizes['ratio_to_fp16']:.3f}× dense fp16) → {final}"
    )
    return info
