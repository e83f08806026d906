"""Params and helpers shared by the weight-quantizing stages (rtn, gptq)."""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from sotool.algos.quant import QuantResult, QuantSpec
from sotool.models.blocks import find_blocks, linear_layers
from sotool.recipe import Strict
from sotool.rundir import write_json
from sotool.tensorio import ShardWriter

Bits = Literal[2, 3, 4, 8]


def _group_ok(v: int) -> int:
    if v == 0 or v < -1:
        raise ValueError("must be -1 (per channel) or a positive number of columns")
    return v


def clip_search(clip: str, group_size: int) -> bool:
    """Whether grids of this group size get the MSE range search under `clip`
    (auto: groups yes, per channel no)."""
    return clip == "mse" or (clip == "auto" and group_size > 0)


def check_regexes(patterns: list[str]) -> list[str]:
    """Validate regexes for pydantic validators (a ValueError names the bad one)."""
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"invalid regex {p!r}: {e}") from e
    return patterns


class LayerOverride(Strict):
    """Per-layer settings for the layers whose name matches `pattern` (a regex)."""

    pattern: str = Field(description="regex searched in the layer's full name")
    bits: Bits | None = None
    group_size: int | None = None
    sym: bool | None = None
    skip: bool = Field(False, description="leave matching layers unquantized")

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regex: {e}") from e
        return v

    @field_validator("group_size")
    @classmethod
    def _gs(cls, v: int | None) -> int | None:
        return None if v is None else _group_ok(v)


class QuantParams(Strict):
    """The grid and layer selection every quantizing stage shares."""

    bits: Bits = Field(4, description="bits per weight")
    group_size: int = Field(128, description="columns per scale group; -1 = per channel")
    sym: bool = Field(True, description="symmetric grid (zero point fixed at 2^(bits-1))")
    clip: Literal["minmax", "mse", "auto"] = Field(
        "minmax",
        description="grid range: plain min/max, the MSE-best shrunk range, or auto (mse "
        "for groups, minmax per channel)",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"], description="regexes of layers to leave alone"
    )
    overrides: list[LayerOverride] = Field(
        default_factory=list, description="per-layer bits/group_size/sym/skip by regex"
    )

    @field_validator("group_size")
    @classmethod
    def _gs(cls, v: int) -> int:
        return _group_ok(v)

    @field_validator("ignore")
    @classmethod
    def _ignore(cls, v: list[str]) -> list[str]:
        return check_regexes(v)

    def spec_for(self, name: str) -> QuantSpec | None:
        """The grid for layer `name`, or None when it is ignored/skipped."""
        if any(re.search(p, name) for p in self.ignore):
            return None
        bits, gs, sym = self.bits, self.group_size, self.sym
        for o in self.overrides:
            if re.search(o.pattern, name):
                if o.skip:
                    return None
                bits = o.bits if o.bits is not None else bits
                gs = o.group_size if o.group_size is not None else gs
                sym = o.sym if o.sym is not None else sym
        return QuantSpec(bits=bits, group_size=gs, sym=sym, mse=self.clip_search(gs))

    def clip_search(self, group_size: int) -> bool:
        return clip_search(self.clip, group_size)


def target_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """All Linear/Conv1D layers inside the transformer blocks, by full name."""
    path, blocks = find_blocks(model)
    out: dict[str, torch.nn.Module] = {}
    for i, block in enumerate(blocks):
        out.update(linear_layers(block, f"{path}.{i}"))
    return out


def param_layout(module: torch.nn.Module, w: torch.Tensor) -> torch.Tensor:
    """An [out, in] matrix in the layout of the module's weight parameter."""
    return w.t().contiguous() if type(module).__name__ == "Conv1D" else w.contiguous()


class QuantStore:
    """Streams per-layer codes/scales/zeros/g_idx into `quant-*.safetensors` shards; the
    grid of each layer goes into `quant.json`."""

    def __init__(self, out_dir: Any) -> None:
        self.out_dir = out_dir
        self.writer = ShardWriter(out_dir, "quant")
        self.meta: dict[str, dict[str, Any]] = {}

    def add(self, name: str, res: QuantResult, spec: QuantSpec) -> None:
        self.writer.add(f"{name}.codes", res.codes)
        self.writer.add(f"{name}.scale", res.scale.float())
        self.writer.add(f"{name}.zero", res.zero.float())
        self.writer.add(f"{name}.g_idx", res.g_idx.to(torch.int32))
        self.meta[name] = {
            "bits": spec.bits,
            "group_size": spec.group_size,
            "sym": spec.sym,
            "clip": "mse" if spec.mse else "minmax",
        }

    def save(self) -> None:
        self.writer.close()
        write_json(self.out_dir / "quant.json", self.meta)
