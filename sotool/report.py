"""Tables (rich, on stderr) and JSON for runs: per-layer results and evaluations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sotool.pipeline import load_run
from sotool.rundir import read_json

LAYER_COLUMNS = {
    # key: (header, format)
    "layer": ("layer", "{}"),
    "shape": ("shape", "{}"),
    "bits": ("bits", "{}"),
    "group_size": ("group", "{}"),
    "h_trace": ("tr(H)", "{:.3g}"),
    "gptq_loss": ("gptq loss", "{:.4g}"),
    "rtn_loss": ("rtn loss", "{:.4g}"),
    "sparsity": ("sparsity", "{:.3f}"),
    "obs_loss": ("obs loss", "{:.4g}"),
    "magnitude_loss": ("magn. loss", "{:.4g}"),
    "ratio": ("ratio", "{:.3f}"),
    "damp": ("λ", "{:g}"),
    "seconds": ("time s", "{:.2f}"),
}


def short_layer(name: str) -> str:
    """'model.layers.12.self_attn.q_proj' -> '12.self_attn.q_proj'."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i:])
    return name


def collect_run(run_dir: str | Path) -> dict[str, Any]:
    """Everything `report` shows, as plain data."""
    _, manifest, recs = load_run(run_dir)
    stages = []
    for r in recs:
        entry: dict[str, Any] = {
            "name": r.name,
            "key": r.key[:16],
            "seconds": r.meta.get("seconds"),
            "summary": r.meta.get("summary", {}),
        }
        layers = r.dir / "layers.json"
        if layers.exists():
            entry["layers"] = read_json(layers)
        stages.append(entry)
    return {"run_dir": str(run_dir), "model": manifest.get("model", {}), "stages": stages}


def _fmt(v: Any, f: str) -> str:
    if v is None:
        return "-"
    try:
        return f.format(v)
    except (ValueError, TypeError):
        return str(v)


def layer_table(
    rows: list[dict[str, Any]],
    title: str,
    sort: str | None,
    top: int | None,
    descending: bool = True,
) -> Table:
    cols = [c for c in LAYER_COLUMNS if any(c in r for r in rows)]
    if sort == "layer":  # model order
        rows = sorted(
            rows, key=lambda r: [int(p) if p.isdigit() else p for p in str(r["layer"]).split(".")]
        )
    elif sort:
        rows = sorted(
            rows,
            key=lambda r: (
                r.get(sort) is None,
                -(r.get(sort) or 0) if descending else (r.get(sort) or 0),
            ),
        )
    shown = rows[:top] if top else rows
    t = Table(title=title, header_style="bold", pad_edge=False, expand=False)
    min_width = {
        "shape": 8,
        "h_trace": 8,
        "gptq_loss": 8,
        "rtn_loss": 8,
        "obs_loss": 8,
        "magnitude_loss": 8,
    }
    for c in cols:
        head = LAYER_COLUMNS[c][0]
        t.add_column(
            head,
            min_width=min_width.get(c),
            justify="left" if c in ("layer", "shape") else "right",
            no_wrap=c == "layer",
            overflow="ellipsis",
        )
    for r in shown:
        vals = []
        for c in cols:
            v = r.get(c)
            if c == "layer":
                v = short_layer(v)
            elif c == "shape" and v:
                v = "×".join(map(str, v))
            vals.append(_fmt(v, LAYER_COLUMNS[c][1]))
        t.add_row(*vals)
    if len(rows) > len(shown):
        t.caption = f"{len(shown)} of {len(rows)} layers (sorted by {sort})"
    return t


def totals_table(data: dict[str, Any]) -> Table:
    t = Table(title="stages", header_style="bold")
    t.add_column("stage")
    t.add_column("time s", justify="right")
    t.add_column("result")
    for s in data["stages"]:
        t.add_row(s["name"], _fmt(s.get("seconds"), "{:.1f}"), summarize(s["name"], s["summary"]))
    return t


def summarize(name: str, s: dict[str, Any]) -> str:
    if not s:
        return ""
    if s.get("kind") == "perplexity":
        txt = f"ppl {s['ppl']:.3f}"
        if "original_ppl" in s:
            txt += f" (original {s['original_ppl']:.3f}, ×{s['ppl_ratio']:.3f})"
        return txt
    if s.get("kind") == "fidelity":
        return f"cosine {s['cosine']:.5f}, rel L2 {s['rel_l2']:.4f}"
    keys = [
        "bits",
        "group_size",
        "sym",
        "act_order",
        "hessians",
        "ratio",
        "samples",
        "seqlen",
        "source",
        "layers",
        "format",
        "bytes",
    ]
    parts = []
    for k in keys:
        if k in s and s[k] is not None:
            v = s[k]
            parts.append(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def print_report(
    run_dir: str | Path, console: Console, sort: str | None = "gptq_loss", top: int | None = None
) -> dict[str, Any]:
    data = collect_run(run_dir)
    for s in data["stages"]:
        rows = s.get("layers")
        if not rows:
            continue
        key = sort if sort and any(sort in r for r in rows) else None
        if key is None:
            key = next(
                (k for k in ("gptq_loss", "obs_loss", "rtn_loss", "weight_mse") if k in rows[0]),
                None,
            )
        console.print(layer_table(rows, f"{s['name']} ({s['key'][:12]}): per layer", key, top))
        tot = {k: sum(r[k] for r in rows if k in r) for k in ("gptq_loss", "rtn_loss")}
        if tot["rtn_loss"]:
            msg = f"total rtn loss {tot['rtn_loss']:.4g}"
            if tot["gptq_loss"]:
                msg = (
                    f"total gptq loss {tot['gptq_loss']:.4g}, {msg}, "
                    f"ratio {tot['gptq_loss'] / tot['rtn_loss']:.3f}"
                )
            console.print(msg)
    console.print(totals_table(data))
    return data


def inspect_table(data: dict[str, Any]) -> Table:
    """`sotool inspect`: one row per weight matrix of an exported model."""
    t = Table(
        title=f"{data['dir']}: {data['format']}, {data['bytes'] / 2**20:.1f} MiB",
        header_style="bold",
        pad_edge=False,
    )
    cols = [
        ("layer", "layer", "{}"),
        ("format", "format", "{}"),
        ("shape", "shape", "{}"),
        ("bits", "bits", "{}"),
        ("group_size", "group", "{}"),
        ("sym", "sym", "{}"),
        ("act_order", "act-order", "{}"),
        ("sparsity", "sparsity", "{:.3f}"),
        ("bytes", "bytes", "{:,}"),
    ]
    for key, head, _ in cols:
        t.add_column(
            head,
            justify="left" if key in ("layer", "format", "shape") else "right",
            no_wrap=key == "layer",
        )
    for r in data["layers"]:
        vals = []
        for key, _, f in cols:
            v = r.get(key)
            if key == "layer":
                v = short_layer(v)
            elif key == "shape":
                v = "×".join(map(str, v))
            vals.append(_fmt(v, f))
        t.add_row(*vals)
    avg = data.get("avg_bits")
    t.caption = f"{data['quantized_layers']} quantized layers" + (
        f", {avg:.2f} bits on average" if avg else ""
    )
    return t
