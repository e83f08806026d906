"""`calibrate`: draw seeded calibration windows and save them as tokens.

Recipe::

    calibration: {source: notes.txt, samples: 64, seqlen: 512}
    stages:
      - calibrate: {}                # or override any calibration field here
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from safetensors.torch import save_file

from sotool.calib import sources
from sotool.errors import SotoolError
from sotool.recipe import CalibrationConfig, Recipe, Strict
from sotool.registry import register_stage
from sotool.rundir import write_json


class CalibrateParams(Strict):
    """Overrides of the recipe's top-level `calibration` section (null = keep it)."""

    source: str | None = Field(None, description="override calibration.source")
    field: str | None = Field(None, description="override calibration.field")
    span: tuple[float, float] | None = Field(None, description="override calibration.span")
    samples: int | None = Field(None, gt=0, description="override calibration.samples")
    seqlen: int | None = Field(None, gt=1, description="override calibration.seqlen")

    def effective(self, recipe: Recipe) -> CalibrationConfig:
        update = {k: v for k, v in self.model_dump().items() if v is not None}
        return CalibrationConfig.model_validate({**recipe.calibration.model_dump(), **update})

    def fingerprint(self, recipe: Recipe) -> dict[str, Any]:
        cfg = self.effective(recipe)
        return {
            "calibration": cfg.model_dump(mode="json", exclude={"batch_size"}),
            "data": sources.source_fingerprint(cfg.source),
        }


def calibration_windows(ctx: Any, cfg: CalibrationConfig, what: str) -> torch.Tensor:
    """(samples, seqlen) int64 token windows for a calibration config."""
    seed = ctx.seed
    if cfg.source == "random":
        model = ctx.model()
        tok = ctx.tokenizer()
        exclude = sources.special_ids(tok) if tok is not None else set()
        return sources.random_tokens(
            cfg.samples, cfg.seqlen, model.config.vocab_size, seed, exclude
        )
    if cfg.source == "generate":
        model = ctx.model()
        tok = ctx.tokenizer()
        start = getattr(tok, "bos_token_id", None) if tok is not None else None
        return sources.generated_tokens(model, cfg.samples, cfg.seqlen, seed, start)
    tok = ctx.tokenizer()
    if tok is None:
        raise SotoolError(
            f"{what}: the model has no tokenizer, so text sources cannot be used; "
            "set source: random"
        )
    text = sources.read_text(cfg.source, cfg.field, what)
    stream = sources.span_of(sources.tokenize_stream(text, tok), cfg.span)
    return sources.random_windows(stream, cfg.samples, cfg.seqlen, seed, what)


@register_stage(
    "calibrate", CalibrateParams, help="draw seeded calibration windows, saved as tokens"
)
def run(ctx: Any, params: CalibrateParams) -> dict[str, Any]:
    cfg = params.effective(ctx.recipe)
    tokens = calibration_windows(ctx, cfg, "calibration.source")
    save_file({"input_ids": tokens.contiguous()}, str(ctx.out_dir / "tokens.safetensors"))
    info = {
        "source": cfg.source,
        "samples": int(tokens.shape[0]),
        "seqlen": int(tokens.shape[1]),
        "span": list(cfg.span),
    }
    write_json(ctx.out_dir / "calibration.json", info)
    ctx.console.print(f"  {tokens.shape[0]} windows × {tokens.shape[1]} tokens from {cfg.source}")
    return info
