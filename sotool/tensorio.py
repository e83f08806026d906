"""Tensors on disk: safetensors shards, written a few tens of MiB at a time so that
saving never doubles the memory of what is saved."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHARD_BYTES = 16 * 2**20  # a shard and its serialised copy are in memory while written


def save_shards(
    tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
    folder: Path,
    stem: str,
    metadata: dict[str, str] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> list[str]:
    """Write `stem-00000.safetensors`, `stem-00001...`; returns the file names."""
    writer = ShardWriter(folder, stem, metadata, shard_bytes)
    for key, t in tensors.items() if isinstance(tensors, dict) else tensors:
        writer.add(key, t)
    return writer.close()


def shard_files(folder: Path, stem: str) -> list[Path]:
    return sorted(Path(folder).glob(f"{stem}-*.safetensors"))


def iter_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of one safetensors file. The tensors are views of
    a private mapping of the file: their pages are read in as they are used."""
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            yield key, f.get_tensor(key)


def iter_shards(folder: Path, stem: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in the shards, one at a time."""
    for path in shard_files(folder, stem):
        yield from iter_file(path)


def load_shards(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """Every tensor of the shards, as a dict."""
    return dict(iter_shards(folder, stem))


class ShardWriter:
    """Streams tensors into safetensors shards as they come (at most one shard in memory)."""

    def __init__(
        self,
        folder: Path,
        stem: str,
        metadata: dict[str, str] | None = None,
        shard_bytes: int = SHARD_BYTES,
        on_flush: Callable[[Path], None] | None = None,
    ) -> None:
        """`on_flush(path)` is called after each shard is written."""
        self.folder, self.stem, self.metadata = Path(folder), stem, metadata
        self.shard_bytes = shard_bytes
        self.on_flush = on_flush
        self.files: list[str] = []
        self._chunk: dict[str, torch.Tensor] = {}
        self._size = 0

    def add(self, key: str, t: torch.Tensor, copy: bool = True) -> None:
        """Queue `t` under `key`; by default a copy (views of batched results share their
        storage); `copy=False` keeps `t` itself, which must then be a CPU tensor with its
        own storage that nobody changes until it is written."""
        if copy:
            t = t.detach().cpu().clone()
        self._chunk[key] = t
        self._size += t.numel() * t.element_size()
        if self._size >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        name = f"{self.stem}-{len(self.files):05d}.safetensors"
        save_file(self._chunk, str(self.folder / name), metadata=self.metadata)
        self.files.append(name)
        self._chunk, self._size = {}, 0
        if self.on_flush is not None:
            self.on_flush(self.folder / name)

    def close(self, metadata: dict[str, str] | None = None) -> list[str]:
        """Write what is left; `metadata` (if given) goes into this last shard."""
        if metadata is not None:
            self.metadata = {**(self.metadata or {}), **metadata}
        if self._chunk or not self.files:
            self._flush()
        return self.files
