"""Write a quantized (and/or sparse) model as a Hugging Face directory that serving
stacks load: compressed-tensors `pack-quantized`, GPTQ (v1/v2), or dense.

The tensor re-encodings are pure functions in `sotool.algos.formats`; this module
decides which layers go where, builds each format's `quantization_config`, checks what
the format's readers cannot take (one line naming the layer, the group size, the width
and what to do) and writes the files.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sotool import __version__
from sotool.algos.formats import to_compressed_tensors, to_gptq, trivial_g_idx, zeros_to_int
from sotool.errors import SotoolError
from sotool.rundir import read_json
from sotool.tensorio import iter_shards

FORMATS = ("dense", "compressed-tensors", "gptq")
SHARD_BYTES = 4 * 2**30  # HF shard size of the exported weights
VLLM_GPTQ_BITS = (4, 8)  # what vLLM's fast GPTQ / compressed-tensors kernels take


@dataclass(frozen=True)
class Scheme:
    """A layer's grid as the formats' configs describe it."""

    bits: int
    group_size: int  # −1 = per channel
    sym: bool


@dataclass
class QuantLayer:
    """One quantized layer: codes (out, in) uint, scale/zero (out, groups) float32,
    g_idx (in,) int32, and its grid."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    scheme: Scheme


def load_quant(stage_dir: Path) -> dict[str, QuantLayer]:
    """The per-layer results a quantizing stage (`gptq`, `rtn`) stored in its folder."""
    meta = read_json(Path(stage_dir) / "quant.json")
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in iter_shards(Path(stage_dir), "quant"):
        name, _, field = key.rpartition(".")
        parts[name][field] = t
    out = {}
    for name, m in meta.items():
        p = parts[name]
        out[name] = QuantLayer(
            codes=p["codes"],
            scale=p["scale"].float(),
            zero=p["zero"].float(),
            g_idx=p["g_idx"].to(torch.int32),
            scheme=Scheme(m["bits"], m["group_size"], m["sym"]),
        )
    return out


# --- checks ----------------------------------------------------------------------------


def check_export(
    model: nn.Module, layers: dict[str, QuantLayer], fmt: str, v1: bool = True
) -> list[str]:
    """Refuse (SotoolError) what the format cannot hold; return warnings for what some of
    its readers cannot take. Each message is one line naming layer, group size, width and
    the remedy."""
    mods = dict(model.named_modules())
    warnings: list[str] = []
    if fmt == "dense":
        return warnings
    for name, q in layers.items():
        mod = mods.get(name)
        if not isinstance(mod, nn.Linear):
            kind = type(mod).__name__ if mod is not None else "missing"
            raise SotoolError(
                f"export: layer {name} is {kind}, not nn.Linear; {fmt} readers load Linear "
                "layers only; use format: dense"
            )
        s, width = q.scheme, q.codes.shape[1]
        partial = s.group_size > 0 and width % s.group_size != 0
        if fmt == "compressed-tensors":
            if partial:
                raise SotoolError(
                    f"export: {name} has width {width}, not a multiple of group_size "
                    f"{s.group_size}; compressed-tensors needs whole groups: quantize with a "
                    f"group_size dividing {width} (e.g. {_divisor_hint(width)}) or use "
                    "format: gptq"
                )
            if not trivial_g_idx(q.g_idx, s.group_size):
                raise SotoolError(
                    f"export: {name} has act-order groups (g_idx not i // {s.group_size}), "
                    "which compressed-tensors no longer reads; quantize with gptq "
                    "static_groups: true or use format: gptq"
                )
        else:
            if partial:
                warnings.append(
                    f"{name}: width {width} is not a multiple of group_size {s.group_size} "
                    "(partial last group); GPTQModel's torch kernel reads it, vLLM and the "
                    f"exllama/marlin kernels need whole groups: use a group_size dividing {width}"
                )
            if v1 and not s.sym and int(zeros_to_int(q.zero).min()) < 1:
                raise SotoolError(
                    f"export: {name} has zero points of 0, which GPTQ v1 (stores zero−1) "
                    "cannot hold; set checkpoint_format: gptq_v2, or quantize with sym: true"
                )
    asym = [n for n, q in layers.items() if not q.scheme.sym]
    if fmt == "compressed-tensors" and asym:
        warnings.append(
            f"{asym[0]} (and {len(asym) - 1} more) asymmetric: transformers with "
            "compressed-tensors 0.20 loads asymmetric pack-quantized checkpoints only through "
            "CompressedTensorsConfig(dequantize=True), and mixed asymmetric grids not at all; "
            "use sym: true or format: gptq for the default from_pretrained path"
        )
    bits = sorted({q.scheme.bits for q in layers.values()} - set(VLLM_GPTQ_BITS))
    if bits:
        warnings.append(
            f"{'/'.join(map(str, bits))}-bit layers: transformers loads them; vLLM's kernels "
            f"serve {' and '.join(map(str, VLLM_GPTQ_BITS))} bits only"
        )
    return warnings


def _divisor_hint(width: int) -> str:
    opts = [g for g in (128, 64, 32, 16) if width % g == 0]
    return ", ".join(map(str, opts[:2])) if opts else "-1 (per channel)"


# --- layer name patterns -----------------------------------------------------------------


def layer_patterns(names: list[str], everyone: list[str]) -> list[str]:
    """Regexes (full-match) covering exactly `names` among `everyone`: one
    `.*\\.SUFFIX$`-style pattern per layer role (e.g. `mlp.down_proj`) when every
    layer of that role is in `names`, else the layer's exact name."""
    role = re.compile(r"^(.*?\.)(\d+)\.(.+)$")

    def suffix(n: str) -> str | None:
        m = role.match(n)
        return m.group(3) if m else None

    by_role: dict[str, set[str]] = defaultdict(set)
    for n in everyone:
        s = suffix(n)
        if s is not None:
            by_role[s].add(n)
    chosen, out = set(names), []
    done_roles = set()
    for n in names:
        s = suffix(n)
        if s is not None and by_role[s] <= chosen:
            if s not in done_roles:
                done_roles.add(s)
                out.append(f".*\\.{re.escape(s)}$")
        else:
            out.append(f"^{re.escape(n)}$")
    return out


def _by_scheme(layers: dict[str, QuantLayer]) -> dict[Scheme, list[str]]:
    groups: dict[Scheme, list[str]] = defaultdict(list)
    for name, q in layers.items():
        groups[q.scheme].append(name)
    # the most common scheme first: it is the base of the GPTQ config
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# --- configs ---------------------------------------------------------------------------


@dataclass
class SparsityInfo:
    """What an upstream pruning stage did: its pattern, overall sparsity and layers."""

    structure: str  # "unstructured", "2:4", ...
    sparsity: float
    layers: list[str]


def compressed_tensors_config(
    model: nn.Module,
    layers: dict[str, QuantLayer],
    act_order: bool,
    sparsity: SparsityInfo | None,
) -> dict[str, Any]:
    """`quantization_config` for compressed-tensors `pack-quantized` (several config
    groups and `format: mixed-precision` when layers differ in grid)."""
    everyone = linear_names(model)
    groups = {}
    for i, (s, names) in enumerate(_by_scheme(layers).items()):
        weights: dict[str, Any] = {
            "num_bits": s.bits,
            "type": "int",
            "symmetric": s.sym,
            "strategy": "channel" if s.group_size <= 0 else "group",
            "group_size": None if s.group_size <= 0 else s.group_size,
            "dynamic": False,
            "observer": "minmax",
        }
        if act_order:
            weights["actorder"] = "weight"  # columns were ordered while solving only
        groups[f"group_{i}"] = {
            "targets": [f"re:{p}" for p in layer_patterns(names, list(layers))],
            "weights": weights,
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    cfg: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized" if len(groups) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [n for n in everyone if n not in layers],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    if sparsity is not None:
        cfg["sparsity_config"] = {
            "format": "dense",
            "sparsity_structure": sparsity.structure,
            "global_sparsity": sparsity.sparsity,
            "targets": [f"re:{p}" for p in layer_patterns(sparsity.layers, everyone)],
            "ignore": [n for n in everyone if n not in set(sparsity.layers)],
        }
    return cfg


def gptq_config(
    model: nn.Module,
    layers: dict[str, QuantLayer],
    v1: bool,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """`quantization_config` for GPTQ: the most common grid at the top, every other grid
    as a `dynamic` override (`+:regex`), block layers left dense as `-:regex`."""
    schemes = _by_scheme(layers)
    base = next(iter(schemes))
    desc_act = any(not trivial_g_idx(q.g_idx, q.scheme.group_size) for q in layers.values())
    dynamic: dict[str, dict[str, Any]] = {}
    for s, names in list(schemes.items())[1:]:
        for p in layer_patterns(names, list(layers)):
            dynamic[f"+:{p}"] = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
    block_dense = [n for n in linear_names(model) if n not in layers and re.search(r"\.\d+\.", n)]
    for n in block_dense:
        dynamic[f"-:^{re.escape(n)}$"] = {}
    cfg: dict[str, Any] = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq" if v1 else "gptq_v2",
        "bits": base.bits,
        "group_size": base.group_size,
        "sym": base.sym,
        "desc_act": desc_act,
        "static_groups": not desc_act,
        "true_sequential": True,
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"sotool:{__version__}"], **meta},
    }
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


# --- tensors and files -----------------------------------------------------------------


def export_tensors(
    model: nn.Module, layers: dict[str, QuantLayer], fmt: str, dtype: torch.dtype, v1: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors: packed ones for quantized layers, the rest in `dtype`
    (tied parameters once, under their first name)."""
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        owner, _, field = key.rpartition(".")
        if fmt != "dense" and owner in layers and field == "weight":
            q = layers[owner]
            if fmt == "compressed-tensors":
                packed = to_compressed_tensors(
                    q.codes, q.scale, q.zero, q.scheme.bits, q.scheme.sym, dtype
                )
            else:
                packed = to_gptq(q.codes, q.scale, q.zero, q.g_idx, q.scheme.bits, v1)
            for k, v in packed.items():
                yield f"{owner}.{k}", v
            continue
        yield key, (t.detach().to(dtype) if t.is_floating_point() else t.detach())


def write_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], out: Path) -> list[str]:
    """`model.safetensors`, or HF-style shards plus `model.safetensors.index.json`."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors:
        nbytes = t.numel() * t.element_size()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = t.contiguous()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names, index = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        names.append(name)
        index.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2) + "\n"
    )
    return names


def write_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    out: Path,
    fmt: str,
    dtype: torch.dtype,
    layers: dict[str, QuantLayer] | None = None,
    quantization_config: dict[str, Any] | None = None,
    v1: bool = True,
) -> int:
    """Write config.json, generation_config.json, tokenizer files and the weights of
    `model` in `fmt` (quantized layers from `layers`). Returns the weights' bytes."""
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "dense":  # transformers' own writer: the universal fallback
        m = model if dtype == next(model.parameters()).dtype else copy.deepcopy(model).to(dtype)
        m.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return sum(f.stat().st_size for f in out.glob("*.safetensors"))
    cfg = copy.deepcopy(model.config)
    cfg.dtype = dtype
    if quantization_config is not None:
        cfg.quantization_config = quantization_config
    elif hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    files = write_safetensors(export_tensors(model, layers or {}, fmt, dtype, v1), out)
    return sum(os.path.getsize(out / f) for f in files)


def dense_bytes(model: nn.Module, bytes_per_param: int = 2) -> int:
    """Bytes of the model's unique parameters and buffers at `bytes_per_param` (fp16: 2)."""
    seen: set[int] = set()
    n = 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * (bytes_per_param if t.is_floating_point() else t.element_size())
    return n
