"""Text sources and token windows.

Sources (the `source` field of `calibration` and `evaluate.data`):
  - a `.txt` file (any other suffix but .jsonl is read as text too);
  - a `.jsonl` file, one JSON object per line, text under `field`;
  - `hf:NAME[:CONFIG][:SPLIT]`, a Hugging Face dataset when the `datasets` package and
    the data are available offline;
  - `pydoc`: the English prose every CPython carries in `pydoc_data.topics`;
  - `generate`: text sampled from the model itself (seeded);
  - `random`: uniformly random token ids (seeded).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from sotool.errors import SotoolError

BUILTIN = {"pydoc", "generate", "random"}


def source_fingerprint(source: str) -> dict[str, Any]:
    """Identity of a source for stage keys: a file's content hash, else the name."""
    if source in BUILTIN or source.startswith("hf:"):
        if source == "pydoc":
            import sys

            return {"source": source, "python": sys.version.split()[0]}
        return {"source": source}
    p = Path(source).expanduser()
    try:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError:
        return {"source": source, "missing": True}
    return {"source": str(p.resolve()), "sha256": digest}


def check_source(source: str, what: str) -> None:
    """Fail early, in one line, when a file source cannot be read."""
    if source in BUILTIN or source.startswith("hf:"):
        return
    p = Path(source).expanduser()
    if not p.exists():
        raise SotoolError(
            f"{what}: file {source!r} not found; give a readable .txt/.jsonl file, "
            f"'hf:NAME', or one of: {', '.join(sorted(BUILTIN))}"
        )
    if p.is_dir():
        raise SotoolError(f"{what}: {source!r} is a directory; give a .txt or .jsonl file")
    try:
        with p.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise SotoolError(
            f"{what}: cannot read {source!r} ({e.strerror}); check permissions"
        ) from e


def pydoc_text() -> str:
    """The prose of CPython's pydoc topics, in a stable order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(source: str, field: str, what: str) -> str:
    """The full text of a text source."""
    if source == "pydoc":
        return pydoc_text()
    if source.startswith("hf:"):
        return _hf_text(source, field, what)
    check_source(source, what)
    p = Path(source).expanduser()
    try:
        raw = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise SotoolError(f"{what}: cannot read {source!r} ({e.strerror})") from e
    if p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SotoolError(f"{what}: {source}:{n}: invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or field not in obj:
                raise SotoolError(
                    f"{what}: {source}:{n}: no field {field!r}; set the `field` option"
                )
            texts.append(str(obj[field]))
        return "\n\n".join(texts)
    return raw


def _hf_text(source: str, field: str, what: str) -> str:
    parts = source[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets
    except ImportError as e:
        raise SotoolError(f"{what}: {source!r} needs the 'datasets' package") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001
        raise SotoolError(
            f"{what}: cannot load dataset {source!r} offline ({type(e).__name__}); "
            "download it first or use a text file"
        ) from e
    if field not in ds.column_names:
        raise SotoolError(f"{what}: dataset has no field {field!r} (has {ds.column_names})")
    return "\n\n".join(t for t in ds[field] if t)


def tokenize_stream(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids (L,) of the whole text, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def span_of(stream: torch.Tensor, span: tuple[float, float]) -> torch.Tensor:
    n = stream.numel()
    return stream[int(span[0] * n) : int(span[1] * n)]


def random_windows(stream: torch.Tensor, n: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    """`n` windows of `seqlen` tokens at seeded random offsets: (n, seqlen) int64."""
    if stream.numel() < seqlen:
        raise SotoolError(
            f"{what}: the text has {stream.numel()} tokens in the chosen span; need at least "
            f"seqlen={seqlen}: lower seqlen or give more text"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (n,), generator=g)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def consecutive_windows(
    stream: torch.Tensor, n: int, seqlen: int, what: str, from_end: bool = True
) -> torch.Tensor:
    """`n` non-overlapping consecutive windows: (n', seqlen) with n' = min(n, available).
    With `from_end`, the windows are the last n·seqlen tokens of the stream."""
    avail = stream.numel() // seqlen
    if avail == 0:
        raise SotoolError(
            f"{what}: the text has {stream.numel()} tokens; need at least seqlen={seqlen}"
        )
    n = min(n, avail)
    chunk = stream[stream.numel() - n * seqlen :] if from_end else stream[: n * seqlen]
    return chunk.reshape(n, seqlen).clone()


def special_ids(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def random_tokens(n: int, seqlen: int, vocab: int, seed: int, exclude: set[int]) -> torch.Tensor:
    """Uniform random token ids (n, seqlen), avoiding special tokens."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(vocab) if i not in exclude], dtype=torch.int64)
    return allowed[torch.randint(0, allowed.numel(), (n, seqlen), generator=g)]


def generated_tokens(
    model: torch.nn.Module,
    n: int,
    seqlen: int,
    seed: int,
    start_id: int | None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Text sampled from a causal LM (temperature 1, seeded): (n, seqlen) int64."""
    torch.manual_seed(seed)
    vocab = model.config.vocab_size
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        first = torch.full((b, 1), start_id if start_id is not None else 0, dtype=torch.int64)
        if start_id is None:
            first = torch.randint(0, vocab, (b, 1))
        with torch.no_grad():
            seq = model.generate(
                first,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=seqlen - 1,
                min_new_tokens=seqlen - 1,
                pad_token_id=start_id if start_id is not None else 0,
            )
        out.append(seq[:, :seqlen])
    return torch.cat(out)
