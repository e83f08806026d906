"""Read an exported model directory (sotool's or another tool's) and describe each layer:
format, bits, group size, symmetry, act-order, sparsity and bytes on disk.

Formats: compressed-tensors `pack-quantized`, GPTQ (v1/v2, with `dynamic` overrides)
and dense safetensors. Shapes and byte counts come from the safetensors headers; only
the tensors needed to count zeros are read.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sotool.algos.formats import from_compressed_tensors, from_gptq, trivial_g_idx
from sotool.errors import SotoolError
from sotool.rundir import read_json

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16}


class _Tensors:
    """Lazy access to every tensor of a directory's safetensors files."""

    def __init__(self, folder: Path) -> None:
        self.files = sorted(folder.glob("*.safetensors"))
        if not self.files:
            raise SotoolError(f"{folder}: no .safetensors files; export the model first")
        self.where: dict[str, Path] = {}
        self.info: dict[str, tuple[str, list[int]]] = {}
        for f in self.files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    sl = h.get_slice(k)
                    self.where[k] = f
                    self.info[k] = (sl.get_dtype(), list(sl.get_shape()))

    def bytes(self, key: str) -> int:
        dtype, shape = self.info[key]
        n = 1
        for s in shape:
            n *= s
        return n * DTYPE_BYTES.get(dtype, 4)

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.where[key]), framework="pt") as h:
            return h.get_tensor(key)

    def layer(self, name: str, fields: list[str]) -> dict[str, torch.Tensor]:
        return {f: self.get(f"{name}.{f}") for f in fields if f"{name}.{f}" in self.info}


def _ct_match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith(f".{pattern}")


def _ct_scheme(qc: dict[str, Any], name: str) -> dict[str, Any] | None:
    if any(_ct_match(p, name) for p in qc.get("ignore") or []):
        return None
    for group in (qc.get("config_groups") or {}).values():
        if any(_ct_match(t, name) or t == "Linear" for t in group.get("targets", [])):
            return group.get("weights")
    return None


def _gptq_scheme(qc: dict[str, Any], name: str) -> dict[str, Any] | None:
    scheme = {k: qc.get(k) for k in ("bits", "group_size", "sym", "desc_act")}
    for pat, over in (qc.get("dynamic") or {}).items():
        neg = pat.startswith("-:")
        body = pat[2:] if pat[:2] in ("+:", "-:") else pat
        if re.match(body, name):
            if neg:
                return None
            return {**scheme, **over}
    return scheme


def _sparsity(codes: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor) -> float:
    """Fraction of weights that dequantize to exactly 0 (code == zero point)."""
    z = zero[:, g_idx.long()]
    return float((codes.float() == z).float().mean())


def inspect_dir(folder: str | Path, count_zeros: bool = True) -> dict[str, Any]:
    """Describe an exported model directory; see the module docstring."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise SotoolError(f"{folder}: no config.json; not a model directory")
    qc = read_json(folder / "config.json").get("quantization_config") or {}
    method = qc.get("quant_method")
    ts = _Tensors(folder)
    by_layer: dict[str, list[str]] = defaultdict(list)
    for k in ts.info:
        owner, _, field = k.rpartition(".")
        by_layer[owner].append(field)
    rows: list[dict[str, Any]] = []
    for name in sorted(by_layer):
        fields = by_layer[name]
        if method == "compressed-tensors" and "weight_packed" in fields:
            rows.append(_ct_row(ts, qc, name, count_zeros))
        elif method == "gptq" and "qweight" in fields:
            rows.append(_gptq_row(ts, qc, name, count_zeros))
        elif "weight" in fields and len(ts.info[f"{name}.weight"][1]) == 2:
            rows.append(_dense_row(ts, name, fields, count_zeros))
    total = sum(ts.bytes(k) for k in ts.info)
    fmt = "dense" if not method else method
    if method == "compressed-tensors":
        fmt = f"compressed-tensors/{qc.get('format')}"
    elif method == "gptq":
        fmt = f"gptq/{qc.get('checkpoint_format', 'gptq')}"
    quant = [r for r in rows if r["format"] != "dense"]
    qparams = sum(r["params"] for r in quant)
    return {
        "dir": str(folder),
        "format": fmt,
        "bytes": total,
        "files": [f.name for f in ts.files],
        "layers": rows,
        "quantized_layers": len(quant),
        "avg_bits": sum(r["bits"] * r["params"] for r in quant) / qparams if qparams else None,
        "sparsity_config": qc.get("sparsity_config") or None,
    }


def _row(name: str, fmt: str, shape: list[int], nbytes: int, **kw: Any) -> dict[str, Any]:
    return {
        "layer": name,
        "format": fmt,
        "shape": shape,
        "params": shape[0] * shape[1],
        "bytes": nbytes,
        **kw,
    }


def _ct_row(ts: _Tensors, qc: dict[str, Any], name: str, count: bool) -> dict[str, Any]:
    w = _ct_scheme(qc, name)
    if w is None:
        raise SotoolError(f"{name}: packed weights but no config group targets it")
    bits = int(w["num_bits"])
    shape = [int(x) for x in ts.get(f"{name}.weight_shape").tolist()]
    keys = [k for k in ts.info if k.rpartition(".")[0] == name]
    sp = None
    if count:
        t = ts.layer(name, ["weight_packed", "weight_scale", "weight_zero_point", "weight_shape"])
        codes, _, zero = from_compressed_tensors(t, bits)
        gs = int(w.get("group_size") or -1) if w.get("strategy") == "group" else -1
        cols = shape[1]
        g_idx = torch.arange(cols) // (gs if gs > 0 else cols)
        sp = _sparsity(codes, zero, g_idx)
    return _row(
        name,
        "compressed-tensors",
        shape,
        sum(ts.bytes(k) for k in keys),
        bits=bits,
        group_size=int(w["group_size"]) if w.get("strategy") == "group" else -1,
        sym=bool(w.get("symmetric", True)),
        act_order=bool(w.get("actorder")) or f"{name}.weight_g_idx" in ts.info,
        sparsity=sp,
    )


def _gptq_row(ts: _Tensors, qc: dict[str, Any], name: str, count: bool) -> dict[str, Any]:
    s = _gptq_scheme(qc, name)
    if s is None:
        raise SotoolError(f"{name}: packed weights but `dynamic` excludes it")
    bits = int(s["bits"])
    cols = ts.info[f"{name}.g_idx"][1][0]
    out_features = ts.info[f"{name}.scales"][1][1]
    keys = [k for k in ts.info if k.rpartition(".")[0] == name]
    sp, act = None, bool(s.get("desc_act"))
    if count:
        v1 = qc.get("checkpoint_format", "gptq") == "gptq"
        t = ts.layer(name, ["qweight", "qzeros", "scales", "g_idx"])
        codes, _, zero, g_idx = from_gptq(t, bits, out_features, v1)
        sp = _sparsity(codes, zero, g_idx)
        act = not trivial_g_idx(g_idx, int(s["group_size"]))
    return _row(
        name,
        "gptq",
        [out_features, cols],
        sum(ts.bytes(k) for k in keys),
        bits=bits,
        group_size=int(s["group_size"]),
        sym=bool(s["sym"]),
        act_order=act,
        sparsity=sp,
    )


def _dense_row(ts: _Tensors, name: str, fields: list[str], count: bool) -> dict[str, Any]:
    dtype, shape = ts.info[f"{name}.weight"]
    sp = float((ts.get(f"{name}.weight") == 0).float().mean()) if count else None
    return _row(
        name,
        "dense",
        shape,
        sum(ts.bytes(f"{name}.{f}") for f in fields),
        bits=DTYPE_BITS.get(dtype, 32),
        group_size=None,
        sym=None,
        act_order=None,
        sparsity=sp,
    )
