"""`export`: write the compressed model where other tools load it.

Recipe::

    - export: {format: dense}                   # a Hugging Face directory, safetensors
    - export: {format: dense, dtype: float16, path: out/my-model}

The model lands in the stage folder (`RUN/stages/export-*/model`), `RUN/model` points
to it, and with `path` it is also copied there.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field

from sotool import __version__
from sotool.recipe import Strict
from sotool.registry import register_stage
from sotool.rundir import write_json


class ExportParams(Strict):
    """Where and how to write the model."""

    format: Literal["dense"] = Field("dense", description="dense: HF safetensors directory")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weight dtype on disk (auto = the model's)"
    )
    path: str | None = Field(None, description="also copy the export to this directory")


def upstream_summary(ctx: Any) -> list[dict[str, Any]]:
    return [
        {"stage": r.name, "key": r.key[:16], "summary": r.meta.get("summary", {})}
        for r in ctx.upstream
    ]


def write_dense(model: torch.nn.Module, tokenizer: Any, out: Path, dtype: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    m = model
    if dtype != "auto" and getattr(torch, dtype) != next(model.parameters()).dtype:
        m = copy.deepcopy(model).to(getattr(torch, dtype))
    m.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def model_card(ctx: Any, fmt: str) -> str:
    lines = [
        f"# Compressed with sotool {__version__}",
        "",
        f"Base model: `{ctx.recipe.model}`. Format: `{fmt}`.",
        "",
        "## Stages",
        "",
    ]
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


@register_stage("export", ExportParams, help="write the model (dense HF safetensors)")
def run(ctx: Any, params: ExportParams) -> dict[str, Any]:
    model = ctx.model()
    out = ctx.out_dir / "model"
    write_dense(model, ctx.tokenizer(), out, params.dtype)
    (out / "sotool_recipe.yaml").write_text(
        yaml.safe_dump(ctx.runner.loaded.resolved(), sort_keys=False)
    )
    write_json(
        out / "sotool_summary.json", {"version": __version__, "stages": upstream_summary(ctx)}
    )
    (out / "README.md").write_text(model_card(ctx, params.format))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
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
    info = {"format": params.format, "dir": str(final), "bytes": size}
    ctx.console.print(f"  exported {params.format} model: {size / 2**20:.1f} MiB → {final}")
    return info
