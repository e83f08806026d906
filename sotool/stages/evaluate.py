"""`evaluate`: perplexity on held-out text (decoders) beside the original model's, or
fidelity to the original (encoders: cosine of final hidden states).

Recipe::

    - evaluate: {data: held_out.txt, windows: 40, seqlen: 512}

Windows are non-overlapping and, by default, taken from the end of the chosen span,
so a file can feed calibration from its start and evaluation from its end.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from safetensors.torch import save_file

from sotool.calib import sources
from sotool.errors import SotoolError
from sotool.evaluation import fidelity, hidden_states, perplexity
from sotool.models.loading import cache_root, is_encoder
from sotool.recipe import Recipe, Strict
from sotool.registry import register_stage
from sotool.rundir import content_key, read_json, write_json


class EvaluateParams(Strict):
    """Held-out evaluation."""

    data: str = Field("pydoc", description="text source (same forms as calibration.source)")
    field: str = Field("text", description="JSONL / dataset field")
    span: tuple[float, float] = Field((0.0, 1.0), description="fractions of the token stream")
    windows: int = Field(40, gt=0, description="number of non-overlapping windows")
    seqlen: int = Field(512, gt=1, description="tokens per window")
    from_end: bool = Field(True, description="take the windows from the end of the span")
    batch_size: int = Field(4, gt=0)
    baseline: bool = Field(True, description="also score the original model (cached)")

    def fingerprint(self, recipe: Recipe) -> dict[str, Any]:
        return {"data": sources.source_fingerprint(self.data)}


def eval_windows(
    params: EvaluateParams, tokenizer: Any, what: str = "evaluate.data"
) -> torch.Tensor:
    if params.data in ("random", "generate"):
        raise SotoolError(f"{what}: evaluate needs real text, not {params.data!r}")
    if tokenizer is None:
        raise SotoolError(f"{what}: the model has no tokenizer; cannot evaluate on text")
    text = sources.read_text(params.data, params.field, what)
    stream = sources.span_of(sources.tokenize_stream(text, tokenizer), params.span)
    return sources.consecutive_windows(stream, params.windows, params.seqlen, what, params.from_end)


def score(
    model: torch.nn.Module, windows: torch.Tensor, params: EvaluateParams, ctx: Any, label: str
) -> dict[str, Any]:
    with ctx.progress(f"evaluate: {label}", windows.shape[0]) as bar:
        res = perplexity(
            model, windows, batch_size=params.batch_size, device=ctx.device, on_batch=bar.advance
        )
    model.to("cpu")
    return res


@register_stage(
    "evaluate",
    EvaluateParams,
    help="perplexity on held-out text beside the original's (encoders: fidelity)",
)
def run(ctx: Any, params: EvaluateParams) -> dict[str, Any]:
    tok = ctx.tokenizer()
    windows = eval_windows(params, tok)
    save_file({"input_ids": windows.contiguous()}, str(ctx.out_dir / "windows.safetensors"))
    model = ctx.model()
    if is_encoder(model.config):
        ref = hidden_states(ctx.original_model(), windows, params.batch_size, ctx.device)
        mine = hidden_states(model, windows, params.batch_size, ctx.device)
        model.to("cpu")
        out = {"kind": "fidelity", **fidelity(ref, mine), "windows": int(windows.shape[0])}
        ctx.console.print(
            f"  cosine to original {out['cosine']:.5f}, relative L2 {out['rel_l2']:.4f}"
        )
        write_json(ctx.out_dir / "eval.json", out)
        return out
    out: dict[str, Any] = {"kind": "perplexity", **score(model, windows, params, ctx, "model")}
    if params.baseline:
        out["original"] = baseline_perplexity(ctx, windows, params)
        out["original_ppl"] = out["original"]["ppl"]
        out["ppl_ratio"] = out["ppl"] / out["original_ppl"]
    msg = f"  perplexity {out['ppl']:.3f}"
    if "original_ppl" in out:
        msg += f" (original {out['original_ppl']:.3f}, ×{out['ppl_ratio']:.3f})"
    ctx.console.print(msg + f" on {windows.shape[0]}×{windows.shape[1]} tokens of {params.data}")
    write_json(ctx.out_dir / "eval.json", out)
    return out


def baseline_perplexity(ctx: Any, windows: torch.Tensor, params: EvaluateParams) -> dict[str, Any]:
    """The original model's perplexity on the same windows, cached across runs."""
    key = content_key(
        {
            "model": ctx.runner.ref.fingerprint,
            "dtype": ctx.recipe.dtype,
            "windows": content_key(windows.tolist()),
        }
    )
    path = cache_root() / "baseline" / f"{key[:24]}.json"
    if path.exists():
        return read_json(path)
    original = ctx.original_model()
    res = score(original, windows, params, ctx, "original model")
    del original
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, res)
    return res
