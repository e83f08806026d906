"""Recipes: YAML validated by pydantic in two passes, with `--set a.b=value` overrides.

Pass one checks the outer shape (model, dtype, device, seed, calibration, stages);
pass two validates each stage's params by the model its plugin registered.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sotool.errors import SotoolError
from sotool.registry import StageSpec, get_stage


class Strict(BaseModel):
    """Base for every params model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSpec(Strict):
    """Where text comes from and which part of its token stream to use."""

    source: str = Field(
        "pydoc",
        description="text file (.txt), JSONL (.jsonl, see `field`), 'hf:NAME[:CONFIG][:SPLIT]' "
        "(Hugging Face datasets, offline cache), 'pydoc' (prose shipped with CPython), "
        "'generate' (text sampled from the model), or 'random' (random tokens)",
    )
    field: str = Field("text", description="JSONL / dataset field holding the text")
    span: tuple[float, float] = Field(
        (0.0, 1.0), description="fractions [start, end) of the token stream to draw from"
    )

    @field_validator("span")
    @classmethod
    def _span_ok(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0.0 <= v[0] < v[1] <= 1.0):
            raise ValueError("must be two fractions 0 <= start < end <= 1")
        return v


class CalibrationConfig(DataSpec):
    """Calibration data: `samples` seeded windows of `seqlen` tokens."""

    samples: int = Field(64, gt=0, description="number of calibration windows")
    seqlen: int = Field(512, gt=1, description="tokens per window")
    batch_size: int = Field(8, gt=0, description="windows per forward pass")


class Recipe(Strict):
    """The outer shape of a recipe; stage params are validated in pass two."""

    model: str = Field(description="HF id, local directory, .gguf file, or a demo name")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("auto", description="'auto' (GPU when present), 'cpu', 'cuda', 'cuda:N'")
    seed: int = 0
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    stages: list[dict[str, dict[str, Any] | None]] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _one_key(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, entry in enumerate(v):
            if len(entry) != 1:
                raise ValueError(
                    f"entry {i} must be one 'name: {{params}}' pair, got {list(entry)}"
                )
        return v


@dataclass(frozen=True)
class StageEntry:
    """One validated stage of a recipe."""

    index: int
    name: str
    spec: StageSpec
    params: BaseModel


@dataclass(frozen=True)
class LoadedRecipe:
    """A recipe after both validation passes."""

    recipe: Recipe
    stages: list[StageEntry]
    source: str  # file the recipe came from, for messages

    def resolved(self) -> dict[str, Any]:
        """The full recipe with every default filled in, as plain data."""
        out = self.recipe.model_dump(mode="json", exclude={"stages"})
        out["stages"] = [{e.name: e.params.model_dump(mode="json")} for e in self.stages]
        return out


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _fix_hint(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "remove it or check its spelling"
    if kind == "missing":
        return "add it"
    return "fix the value"


def format_validation_error(source: str, exc: ValidationError, prefix: str = "") -> str:
    """One line: `file: field.path: message (got X); fix`."""
    err = exc.errors()[0]
    loc = _fmt_loc(err["loc"])
    path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    got = ""
    if err["type"] != "missing" and "input" in err and not isinstance(err["input"], dict):
        got = f" (got {err['input']!r})"
    more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"{source}: {path}: {msg}{got}; {_fix_hint(err)}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML)."""
    if "=" not in text:
        raise SotoolError(f"--set {text!r}: expected KEY=VALUE, e.g. --set gptq.bits=3")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise SotoolError(f"--set {text!r}: empty key; e.g. --set gptq.bits=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _stage_slot(data: dict[str, Any], head: str, override: str) -> dict[str, Any]:
    """The params dict of the stage addressed by `head` ('gptq', 'gptq#1' or 'stages.N')."""
    stages = data.get("stages")
    if not isinstance(stages, list):
        raise SotoolError(f"--set {override!r}: the recipe has no stages list")
    name, _, nth = head.partition("#")
    hits = [i for i, e in enumerate(stages) if isinstance(e, dict) and name in e]
    if not hits:
        raise SotoolError(
            f"--set {override!r}: no stage or field {name!r} in the recipe "
            f"(top-level fields: {', '.join(Recipe.model_fields)}; stages: "
            f"{', '.join(next(iter(e)) for e in stages if isinstance(e, dict) and e)})"
        )
    if nth:
        if not nth.isdigit() or int(nth) >= len(hits):
            raise SotoolError(f"--set {override!r}: the recipe has {len(hits)} {name!r} stage(s)")
        idx = hits[int(nth)]
    elif len(hits) > 1:
        raise SotoolError(
            f"--set {override!r}: {len(hits)} stages are named {name!r}; "
            f"write {name}#0, {name}#1, ... to pick one"
        )
    else:
        idx = hits[0]
    entry = stages[idx]
    if entry[name] is None:
        entry[name] = {}
    return entry[name]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` overrides to raw recipe data (types are checked by validation)."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        head, rest = path[0], path[1:]
        if head == "stages" and rest and rest[0].isdigit():
            stages = data.get("stages") or []
            i = int(rest[0])
            if i >= len(stages):
                raise SotoolError(f"--set {text!r}: the recipe has {len(stages)} stages")
            entry = stages[i]
            name = next(iter(entry))
            if entry[name] is None:
                entry[name] = {}
            target, rest = entry[name], rest[1:]
        elif head in Recipe.model_fields:
            target, rest = data, path
        else:
            target = _stage_slot(data, head, text)
        if not rest:
            raise SotoolError(f"--set {text!r}: give a field, e.g. --set {head}.bits=3")
        for p in rest[:-1]:
            nxt = target.get(p)
            if nxt is None:
                nxt = target[p] = {}
            if not isinstance(nxt, dict):
                raise SotoolError(f"--set {text!r}: {p!r} is not a mapping")
            target = nxt
        target[rest[-1]] = value
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a recipe file into raw data, with one-line errors."""
    if not path.exists():
        raise SotoolError(f"{path}: recipe file not found; check the path")
    try:
        text = path.read_text()
    except OSError as e:
        raise SotoolError(f"{path}: cannot read recipe ({e.strerror}); check permissions") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SotoolError(f"{path}{where}: YAML syntax error: {problem}; fix the YAML") from e
    if not isinstance(data, dict):
        raise SotoolError(f"{path}: a recipe is a YAML mapping with 'model' and 'stages'")
    return data


def validate_recipe(data: dict[str, Any], source: str) -> LoadedRecipe:
    """Both validation passes over raw recipe data."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise SotoolError(format_validation_error(source, e)) from e
    entries: list[StageEntry] = []
    for i, raw in enumerate(recipe.stages):
        name, params = next(iter(raw.items()))
        try:
            spec = get_stage(name)
        except SotoolError as e:
            raise SotoolError(f"{source}: stages[{i}]: {e}") from e
        try:
            model = spec.params.model_validate(params or {})
        except ValidationError as e:
            raise SotoolError(format_validation_error(source, e, f"stages[{i}].{name}")) from e
        entries.append(StageEntry(i, name, spec, model))
    return LoadedRecipe(recipe, entries, source)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [])
    return validate_recipe(data, str(path))
