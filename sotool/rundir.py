"""The run directory: manifest, content-keyed stage folders, atomic writes.

Layout::

    RUN/manifest.json                 tool version, resolved recipe, per-stage key/status/timing
    RUN/stages/<name>-<key16>/        one folder per stage result, named by its content key
        stage.json                    written last: its presence means the stage is complete
    RUN/stages/.tmp-*                 work in progress; renamed into place when complete
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sotool import __version__
from sotool.errors import SotoolError


def content_key(obj: Any) -> str:
    """A stable sha256 hex digest of JSON-able data."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class RunDir:
    """One run directory on disk."""

    def __init__(self, root: str | Path, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            try:
                (self.root / "stages").mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SotoolError(f"{self.root}: cannot create run directory ({e.strerror})") from e
        elif not (self.root / "manifest.json").exists():
            raise SotoolError(f"{self.root}: not a run directory (no manifest.json)")

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def load_manifest(self) -> dict[str, Any]:
        if self.manifest_path.exists():
            return read_json(self.manifest_path)
        return {}

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = {"tool": "sotool", "version": __version__, **manifest}
        write_json(self.manifest_path, manifest)

    @staticmethod
    def folder_name(name: str, key: str) -> str:
        return f"{name}-{key[:16]}"

    def stage_dir(self, name: str, key: str) -> Path:
        return self.root / "stages" / self.folder_name(name, key)

    def stage_record(self, name: str, key: str) -> dict[str, Any] | None:
        """The completed stage's stage.json, or None when not done."""
        path = self.stage_dir(name, key) / "stage.json"
        if not path.exists():
            return None
        rec = read_json(path)
        return rec if rec.get("key") == key and rec.get("status") == "done" else None

    def reuse_from_siblings(self, name: str, key: str) -> Path | None:
        """Bring a completed copy of this stage from a sibling run directory (hard links)."""
        folder = self.folder_name(name, key)
        parent = self.root.resolve().parent
        for other in sorted(parent.iterdir()):
            src = other / "stages" / folder
            if other.resolve() == self.root.resolve() or not (src / "stage.json").exists():
                continue
            rec = read_json(src / "stage.json")
            if rec.get("key") != key or rec.get("status") != "done":
                continue
            with self.writing(name, key) as tmp:
                shutil.rmtree(tmp)

                def link(a: str, b: str) -> None:
                    try:
                        os.link(a, b)
                    except OSError:
                        shutil.copy2(a, b)

                shutil.copytree(src, tmp, copy_function=link)
            return src
        return None

    def clean_stale(self) -> list[Path]:
        """Remove temporary folders left by interrupted runs."""
        stale = list((self.root / "stages").glob(".tmp-*"))
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return stale

    @contextmanager
    def writing(self, name: str, key: str) -> Iterator[Path]:
        """A temporary folder that becomes the stage folder only if the block completes."""
        final = self.stage_dir(name, key)
        tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}")
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
