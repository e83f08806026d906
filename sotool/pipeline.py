"""Run a recipe: resolve each stage's content key, skip the done ones, run the rest.

A stage's key hashes its type, validated params, algorithm version and the key of the
stage before it (so a change reruns that stage and everything after it, and nothing
before). Weights flow between stages as overrides: a stage that modifies weights
saves them in its folder (`weights-*.safetensors`), and later stages see the base model
with every upstream override applied.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file

from sotool import __version__
from sotool.errors import SotoolError
from sotool.memory import freeze_heap, page_out, release
from sotool.models.loading import ModelRef, load_model, load_tokenizer, resolve_model
from sotool.progress import make_progress
from sotool.recipe import LoadedRecipe, StageEntry
from sotool.rundir import RunDir, content_key, read_json, write_json
from sotool.tensorio import SHARD_BYTES, ShardWriter, iter_file, iter_shards, save_shards

WEIGHTS = "weights"  # stem of the shards holding a stage's new weights


def pick_device(spec: str) -> torch.device:
    """'auto' -> cuda when present, else cpu; anything else as given (checked)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise SotoolError(f"device: {spec!r} is not a device; use auto, cpu or cuda[:N]") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SotoolError(f"device: {spec!r} requested but no CUDA device is present; use auto")
    return dev


@dataclass
class StageRecord:
    """A completed stage as later stages see it."""

    name: str
    key: str
    dir: Path
    meta: dict[str, Any]

    @property
    def modifies_weights(self) -> bool:
        return bool(self.meta.get("modifies_weights"))


class ModelSession:
    """Holds the loaded model across stages and applies weight overrides incrementally."""

    def __init__(self, ref: ModelRef, dtype: str) -> None:
        self.ref = ref
        self.dtype = dtype
        self._model: torch.nn.Module | None = None
        self._applied: list[str] = []
        self._tokenizer: Any = None
        self._tok_loaded = False

    def tokenizer(self) -> Any:
        if not self._tok_loaded:
            self._tokenizer = load_tokenizer(self.ref)
            self._tok_loaded = True
        return self._tokenizer

    def base(self) -> torch.nn.Module:
        """A fresh copy of the original model."""
        model = load_model(self.ref, self.dtype)
        freeze_heap()
        return model

    def model(self, upstream: list[StageRecord]) -> torch.nn.Module:
        """The model with the weight overrides of `upstream` applied, in order."""
        want = [r for r in upstream if r.modifies_weights]
        keys = [r.key for r in want]
        if self._model is None or self._applied != keys[: len(self._applied)]:
            self._model = self.base()
            self._applied = []
        for rec in want[len(self._applied) :]:
            apply_weights(self._model, iter_shards(rec.dir, WEIGHTS))
            self._applied.append(rec.key)
        return self._model

    def adopt(self, key: str) -> None:
        """The in-memory model now also carries stage `key`'s weights."""
        self._applied.append(key)

    def drop(self) -> None:
        self._model = None
        self._applied = []


def apply_weights(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> None:
    """Point the model's parameters (state_dict names) at the given tensors.

    Tensors read from safetensors shards stay views of their file, so a weight costs
    memory only while it is being used; the pages of the weights they replace are handed
    back at once (`page_out`). Tied parameters change together.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    items = tensors.items() if isinstance(tensors, dict) else tensors
    for name, t in items:
        _point(params, name, t)


def _param(params: dict[str, torch.nn.Parameter], name: str) -> torch.nn.Parameter:
    p = params.get(name)
    if p is None:
        raise SotoolError(f"saved weight {name!r} does not exist in the model")
    return p


def _point(params: dict[str, torch.nn.Parameter], name: str, t: torch.Tensor) -> None:
    p = _param(params, name)
    if tuple(t.shape) != tuple(p.shape):
        raise SotoolError(
            f"saved weight {name!r} has shape {tuple(t.shape)}, the model's "
            f"{tuple(p.shape)}: the run directory belongs to another model"
        )
    old = p.data
    p.data = t.to(p.device, p.dtype)
    if old.data_ptr() != p.data.data_ptr():
        page_out([old])


class WeightSpill:
    """A stage's new weights, written to its folder as they come (`weights-*` shards)
    and mapped back from there, so the modified model never holds more than one shard
    of them in ordinary memory. Each weight is set at most once per stage."""

    def __init__(
        self, model: torch.nn.Module, folder: Path, shard_bytes: int = SHARD_BYTES
    ) -> None:
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.writer = ShardWriter(folder, WEIGHTS, shard_bytes=shard_bytes, on_flush=self._map)
        self.names: set[str] = set()

    def _map(self, path: Path) -> None:  # a written shard replaces the copies it holds
        for name, t in iter_file(path):
            _point(self.params, name, t)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            p = _param(self.params, name)
            if name in self.names:
                raise ValueError(f"weight {name!r} set twice in one stage")
            self.names.add(name)
            owned = t.detach().to("cpu", p.dtype, copy=True).contiguous()
            _point(self.params, name, owned)  # seen by the model now
            self.writer.add(name, owned, copy=False)  # a full shard is mapped back

    def close(self) -> None:
        self.writer.close()


class StageContext:
    """What a stage's run function gets: params, folders, data and the model."""

    def __init__(
        self,
        runner: Runner,
        entry: StageEntry,
        key: str,
        out_dir: Path,
        upstream: list[StageRecord],
    ) -> None:
        self.runner = runner
        self.entry = entry
        self.key = key
        self.out_dir = out_dir
        self.upstream = upstream
        self.recipe = runner.loaded.recipe
        self.console = runner.console
        self.device = runner.device
        self.seed = runner.loaded.recipe.seed
        self._spill: WeightSpill | None = None

    # data -----------------------------------------------------------------
    def find(self, name: str) -> StageRecord | None:
        """The latest upstream stage of type `name`, if any."""
        for rec in reversed(self.upstream):
            if rec.name == name:
                return rec
        return None

    def require(self, name: str) -> StageRecord:
        rec = self.find(name)
        if rec is None:
            raise SotoolError(
                f"stage {self.entry.name!r} (stages[{self.entry.index}]) needs a {name!r} "
                f"stage before it; add '- {name}: {{}}' earlier in the recipe"
            )
        return rec

    def calibration_tokens(self) -> torch.Tensor:
        """(N, T) int64 calibration windows from the latest `calibrate` stage."""
        rec = self.require("calibrate")
        return load_file(str(rec.dir / "tokens.safetensors"))["input_ids"]

    # model ----------------------------------------------------------------
    def model(self) -> torch.nn.Module:
        """The model with every upstream stage's weights applied. A stage that
        modifies weights changes it only through `set_weights`."""
        return self.runner.session.model(self.upstream)

    def original_model(self) -> torch.nn.Module:
        """A separate, unmodified copy of the original model."""
        return self.runner.session.base()

    def tokenizer(self) -> Any:
        return self.runner.session.tokenizer()

    def set_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """New weights (state_dict names, each at most once per stage): the in-memory
        model uses them now; they are saved with the stage as they come."""
        if self._spill is None:
            self._spill = WeightSpill(self.runner.session.model(self.upstream), self.out_dir)
        self._spill.add(tensors)

    def progress(self, description: str, total: int | None) -> Any:
        return self.runner.progress_task(description, total)

    def save_weights(self) -> None:
        """Write what is left of the new weights (an empty shard when there are none)."""
        if self._spill is None:
            save_shards({}, self.out_dir, WEIGHTS)
        else:
            self._spill.close()


class Runner:
    """Executes a validated recipe in a run directory."""

    def __init__(
        self, loaded: LoadedRecipe, run_dir: str | Path, console: Console | None = None
    ) -> None:
        self.loaded = loaded
        self.rundir = RunDir(run_dir)
        self.console = console or Console(stderr=True)
        self.ref = resolve_model(loaded.recipe.model)
        self.device = pick_device(loaded.recipe.device)
        self.session = ModelSession(self.ref, loaded.recipe.dtype)
        self._progress: Any = None

    def progress_task(self, description: str, total: int | None) -> Any:
        return _Task(self._progress, description, total)

    def base_key(self) -> str:
        r = self.loaded.recipe
        return content_key({"model": self.ref.fingerprint, "dtype": r.dtype, "seed": r.seed})

    def stage_key(self, entry: StageEntry, prev: str) -> str:
        extra = {}
        fp = getattr(entry.params, "fingerprint", None)
        if callable(fp):
            extra = fp(self.loaded.recipe)
        return content_key(
            {
                "stage": entry.name,
                "version": entry.spec.version,
                "params": entry.params.model_dump(mode="json"),
                "extra": extra,
                "prev": prev,
            }
        )

    def plan(self) -> list[tuple[StageEntry, str]]:
        prev = self.base_key()
        out = []
        for entry in self.loaded.stages:
            prev = self.stage_key(entry, prev)
            out.append((entry, prev))
        return out

    def run(self, force: bool = False) -> dict[str, Any]:
        """Run every stage not yet done; returns the run's result."""
        stale = self.rundir.clean_stale()
        if stale:
            self.console.print(
                f"[yellow]removed {len(stale)} unfinished stage folder(s) "
                "from an interrupted run[/]"
            )
        plan = self.plan()
        manifest = {
            "recipe": self.loaded.resolved(),
            "recipe_file": self.loaded.source,
            "model": {"spec": self.ref.spec, "kind": self.ref.kind, "path": self.ref.path},
            "stages": [
                {
                    "index": e.index,
                    "name": e.name,
                    "key": k,
                    "dir": f"stages/{RunDir.folder_name(e.name, k)}",
                    "status": "pending",
                }
                for e, k in plan
            ],
        }
        self.rundir.save_manifest(manifest)
        upstream: list[StageRecord] = []
        results = []
        with make_progress(self.console) as progress:
            self._progress = progress
            for (entry, key), mstage in zip(plan, manifest["stages"], strict=True):
                rec = self.rundir.stage_record(entry.name, key) if not force else None
                status = "skipped"
                if rec is None and not force and self.rundir.reuse_from_siblings(entry.name, key):
                    rec = self.rundir.stage_record(entry.name, key)
                    status = "reused"
                if rec is None:
                    rec = self._run_stage(entry, key, upstream, mstage, manifest)
                    status = "ran"
                else:
                    self.console.print(
                        f"[dim]{entry.name}: {'done' if status == 'skipped' else 'reused'} "
                        f"({key[:12]})[/]"
                    )
                mstage.update(
                    status="done",
                    action=status,
                    seconds=rec.get("seconds"),
                    started=rec.get("started"),
                    finished=rec.get("finished"),
                )
                self.rundir.save_manifest(manifest)
                srec = StageRecord(entry.name, key, self.rundir.stage_dir(entry.name, key), rec)
                upstream.append(srec)
                results.append(
                    {
                        "index": entry.index,
                        "name": entry.name,
                        "key": key,
                        "action": status,
                        "seconds": rec.get("seconds"),
                        "summary": rec.get("summary", {}),
                    }
                )
        self._progress = None
        return {"run_dir": str(self.rundir.root), "version": __version__, "stages": results}

    def _run_stage(
        self,
        entry: StageEntry,
        key: str,
        upstream: list[StageRecord],
        mstage: dict[str, Any],
        manifest: dict[str, Any],
    ) -> dict[str, Any]:
        started = time.time()
        mstage.update(status="running", started=started)
        self.rundir.save_manifest(manifest)
        with self.rundir.writing(entry.name, key) as tmp:
            ctx = StageContext(self, entry, key, tmp, upstream)
            self.console.print(f"[bold]{entry.name}[/] ({key[:12]})")
            t0 = time.perf_counter()
            try:
                summary = entry.spec.run(ctx, entry.params) or {}
            except BaseException:
                self.session.drop()  # the in-memory model may be half-modified
                raise
            if entry.spec.modifies_weights:
                ctx.save_weights()
                self.session.adopt(key)
            seconds = time.perf_counter() - t0
            release()
            rec = {
                "name": entry.name,
                "key": key,
                "status": "done",
                "version": entry.spec.version,
                "params": entry.params.model_dump(mode="json"),
                "modifies_weights": entry.spec.modifies_weights,
                "seconds": round(seconds, 3),
                "started": started,
                "finished": time.time(),
                "summary": summary,
                "tool_version": __version__,
            }
            _fault_point(entry.name)
            write_json(tmp / "stage.json", rec)
        return rec


def _fault_point(stage: str) -> None:
    """Fault injection for resume tests: SOTOOL_KILL_IN=<stage> kills the process after
    the stage wrote its files but before they are committed."""
    if os.environ.get("SOTOOL_KILL_IN") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


class _Task:
    def __init__(self, progress: Any, description: str, total: int | None) -> None:
        self.progress = progress
        self.id = progress.add_task(description, total=total) if progress is not None else None

    def advance(self, n: int = 1) -> None:
        if self.id is not None:
            self.progress.advance(self.id, n)

    def update(self, **kw: Any) -> None:
        if self.id is not None:
            self.progress.update(self.id, **kw)

    def __enter__(self) -> _Task:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.id is not None:
            self.progress.remove_task(self.id)


def load_run(run_dir: str | Path) -> tuple[RunDir, dict[str, Any], list[StageRecord]]:
    """Open a run directory: (RunDir, manifest, completed stage records in order)."""
    rd = RunDir(run_dir, create=False)
    manifest = rd.load_manifest()
    recs = []
    for s in manifest.get("stages", []):
        d = rd.root / s["dir"]
        if (d / "stage.json").exists():
            recs.append(StageRecord(s["name"], s["key"], d, read_json(d / "stage.json")))
    return rd, manifest, recs


def preflight(loaded: LoadedRecipe) -> None:
    """Checks that need no model load: model path, data files, device."""
    from sotool.calib.sources import check_source

    resolve_model(loaded.recipe.model)
    pick_device(loaded.recipe.device)
    for e in loaded.stages:
        if e.name == "calibrate":
            cfg = e.params.effective(loaded.recipe)  # type: ignore[attr-defined]
            check_source(cfg.source, f"{loaded.source}: calibration.source")
        data = getattr(e.params, "data", None)
        if isinstance(data, str):
            check_source(data, f"{loaded.source}: stages[{e.index}].{e.name}.data")


def evaluate_target(
    target: str,
    *,
    data: str,
    windows: int,
    seqlen: int,
    span: tuple[float, float],
    device: str,
    console: Console,
) -> dict[str, Any]:
    """Perplexity of a model reference or of a run directory's final weights."""
    from sotool.calib.sources import check_source
    from sotool.evaluation import perplexity
    from sotool.stages.evaluate import EvaluateParams, eval_windows

    check_source(data, "--data")
    params = EvaluateParams(data=data, windows=windows, seqlen=seqlen, span=span)
    run = Path(target)
    if (run / "manifest.json").exists():
        _, manifest, recs = load_run(run)
        ref = resolve_model(manifest["recipe"]["model"])
        session = ModelSession(ref, manifest["recipe"].get("dtype", "float32"))
        model = session.model(recs)
    else:
        ref = resolve_model(target)
        session = ModelSession(ref, "float32")
        model = session.base()
    w = eval_windows(params, session.tokenizer(), "--data")
    with make_progress(console) as progress:
        task = _Task(progress, "evaluate", w.shape[0])
        res = perplexity(model, w, batch_size=4, device=pick_device(device), on_batch=task.advance)
    return {"target": target, **res}
