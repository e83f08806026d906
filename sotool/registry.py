"""A tiny decorator registry from stage name to its params model and run function."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from sotool.errors import SotoolError


@dataclass(frozen=True)
class StageSpec:
    """A registered stage.

    Attributes:
        name: the key used in recipes (`- gptq: {...}`).
        params: pydantic model validating the stage's params (extra keys forbidden).
        run: `run(ctx, params) -> dict` doing the work; returns the stage summary.
        help: one-line description shown by `sotool stages`.
        version: algorithm version; bump it to invalidate cached results.
        modifies_weights: the stage writes new weights that later stages see.
    """

    name: str
    params: type[BaseModel]
    run: Callable[..., dict[str, Any]]
    help: str
    version: str
    modifies_weights: bool


_STAGES: dict[str, StageSpec] = {}


def register_stage(
    name: str,
    params: type[BaseModel],
    *,
    help: str,
    version: str = "1",
    modifies_weights: bool = False,
) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Register `run(ctx, params)` as the stage `name`."""

    def deco(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        if name in _STAGES:
            raise ValueError(f"stage {name!r} registered twice")
        _STAGES[name] = StageSpec(name, params, fn, help, version, modifies_weights)
        return fn

    return deco


def _load_builtin() -> None:
    import sotool.stages  # noqa: F401  (registers the built-in stages)


def known_stages() -> dict[str, StageSpec]:
    """All registered stages by name, in registration order."""
    _load_builtin()
    return dict(_STAGES)


def get_stage(name: str) -> StageSpec:
    """The stage registered as `name`; unknown names list the known ones."""
    stages = known_stages()
    if name in stages:
        return stages[name]
    close = difflib.get_close_matches(name, list(stages), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise SotoolError(f"unknown stage {name!r}: {hint}known stages: {', '.join(stages)}")
