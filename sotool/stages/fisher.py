"""`fisher`: per-sample gradients of the model's loss for every block layer, on disk.

Recipe::

    - calibrate: {}
    - fisher: {samples: 32}
    - prune: {method: obert, sparsity: 0.5, pattern: block4}

Each calibration window is one sample: its loss is the causal-LM loss for decoders and
the masked-LM loss for encoders (15% of the positions, chosen by a generator seeded from
the recipe's seed and the sample's index, replaced by the mask token, or by a random
token when the tokenizer has none). One backward pass per sample gives the gradient of
every block layer's weight, which is streamed straight into `grads-*.safetensors` shards
(64 MiB each) and dropped: memory stays at one model, its weight gradients and one
sample's activations, whatever m is, and no Fisher matrix is ever formed here. Consumers
(`prune` with `obert`, or `allocation: global`) read one layer's m gradients at a time
(m × d_layer values) and build the block-diagonal Fisher inverse or M-FAC products from
them, so the stage is shared by every block size, damping and pattern. Disk is m × (the
number of block weights) × 2 bytes in bfloat16 (SmolLM2-135M: 106M weights, 212 MB per
sample).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors import safe_open

from sotool.errors import SotoolError
from sotool.models.blocks import weight_matrix
from sotool.models.loading import is_encoder
from sotool.recipe import Strict
from sotool.registry import register_stage
from sotool.rundir import read_json, write_json
from sotool.stages._quant import target_layers
from sotool.tensorio import ShardWriter, shard_files

GRADS = "grads"


class FisherParams(Strict):
    """Per-sample gradients for the empirical Fisher."""

    samples: int = Field(32, gt=0, description="m: calibration windows, one gradient each")
    seqlen: int | None = Field(
        None, gt=1, description="tokens per sample (null = the calibration windows' length)"
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="storage type of the gradients on disk"
    )
    mask_prob: float = Field(0.15, gt=0, lt=1, description="encoders: masked-LM position rate")


def mlm_inputs(
    ids: torch.Tensor, mask_id: int | None, vocab: int, prob: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM inputs and labels for ids (B, T): `prob` of the positions (at least one per
    row, seeded) become `mask_id` (or a random token when None); labels are −100 elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.rand(ids.shape, generator=gen) < prob
    first = torch.randint(ids.shape[1], (ids.shape[0],), generator=gen)
    pick[torch.arange(ids.shape[0]), first] = True
    if mask_id is None:
        fill = torch.randint(vocab, ids.shape, generator=gen)
    else:
        fill = torch.full_like(ids, mask_id)
    inputs = torch.where(pick, fill, ids)
    labels = ids.masked_fill(~pick, -100)
    return inputs, labels


def sample_loss(
    model: torch.nn.Module,
    ids: torch.Tensor,
    encoder: bool,
    mask_id: int | None,
    prob: float,
    seed: int,
) -> torch.Tensor:
    """The model's own loss on windows ids (B, T): causal-LM, or masked-LM for encoders."""
    if encoder:
        inputs, labels = mlm_inputs(ids, mask_id, model.config.vocab_size, prob, seed)
    else:
        inputs, labels = ids, ids
    out = model(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=labels)
    if getattr(out, "loss", None) is None:
        raise SotoolError(
            f"fisher: {type(model).__name__} returns no loss; the model needs a language-"
            "modelling head (causal-LM or masked-LM)"
        )
    return out.loss


class FisherStore:
    """Read access to a `fisher` stage folder: per layer, its (m, R·C) gradients."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.meta: dict[str, Any] = read_json(self.folder / "fisher.json")
        self.where: dict[str, Path] = {}
        for path in shard_files(self.folder, GRADS):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    self.where[key] = path

    @property
    def samples(self) -> int:
        return int(self.meta["samples"])

    def __contains__(self, name: str) -> bool:
        return f"{name}#0" in self.where

    def get(self, name: str) -> torch.Tensor:
        """(m, R·C) float32 gradients of layer `name` (weights as [out, in], row-major)."""
        keys = [f"{name}#{i}" for i in range(self.samples)]
        rows: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        for path, ks in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for k in ks:
                    rows[k] = f.get_tensor(k).float()
        return torch.stack([rows[k] for k in keys])


@register_stage(
    "fisher",
    FisherParams,
    help="per-sample loss gradients of every block layer, streamed to disk (empirical Fisher)",
)
def run(ctx: Any, params: FisherParams) -> dict[str, Any]:
    model = ctx.model()
    tokens = ctx.calibration_tokens()
    if tokens.shape[0] < params.samples:
        raise SotoolError(
            f"fisher.samples: {params.samples} gradients need as many calibration windows, "
            f"but calibration has {tokens.shape[0]}; raise calibration.samples or lower "
            "fisher.samples"
        )
    if params.seqlen is not None:
        tokens = tokens[:, : params.seqlen]
    encoder = is_encoder(model.config)
    tok = ctx.tokenizer()
    mask_id = getattr(tok, "mask_token_id", None) if tok is not None else None
    layers = target_layers(model)
    wanted = {id(m.weight) for m in layers.values()}
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    storage = getattr(torch, params.dtype)
    writer = ShardWriter(ctx.out_dir, GRADS, shard_bytes=64 * 2**20)
    model.to(ctx.device)
    t0 = time.perf_counter()
    losses = []
    try:
        with ctx.progress("fisher: samples", params.samples) as bar:
            for i in range(params.samples):
                ids = tokens[i : i + 1].to(ctx.device)
                loss = sample_loss(
                    model, ids, encoder, mask_id, params.mask_prob, ctx.seed * 100_003 + i
                )
                loss.backward()
                losses.append(float(loss.detach()))
                for name, mod in layers.items():
                    g = mod.weight.grad
                    g = g.t() if type(mod).__name__ == "Conv1D" else g
                    writer.add(f"{name}#{i}", g.reshape(-1).to(storage))
                    mod.weight.grad = None
                bar.advance()
    finally:
        model.to("cpu")
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = None
    files = writer.close()
    shapes = {n: list(weight_matrix(m).shape) for n, m in layers.items()}
    info = {
        "samples": params.samples,
        "seqlen": int(tokens.shape[1]),
        "loss": "masked-lm" if encoder else "causal-lm",
        "mean_loss": sum(losses) / len(losses),
        "layers": len(layers),
        "weights": sum(r * c for r, c in shapes.values()),
        "dtype": params.dtype,
        "bytes": sum((ctx.out_dir / f).stat().st_size for f in files),
        "seconds_per_sample": (time.perf_counter() - t0) / params.samples,
    }
    write_json(ctx.out_dir / "fisher.json", {**info, "shapes": shapes})
    ctx.console.print(
        f"  {params.samples} gradients of {len(layers)} layers ({info['loss']}), "
        f"{info['bytes'] / 2**30:.2f} GiB on disk"
    )
    return info
