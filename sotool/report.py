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
    "pattern": ("pattern", "{}"),
    "sparsity": ("sparsity", "{:.3f}"),
    "obs_loss": ("obs loss", "{:.3g}"),
    "magnitude_loss": ("magn. loss", "{:.3g}"),
    "ratio": ("ratio", "{:.3f}"),
    "damp": ("λ", "{:g}"),
    "seconds": ("time s", "{:.2f}"),
}


CONSTANT_IN_TITLE = ("pattern",)


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
    for c in CONSTANT_IN_TITLE:  # one value for every layer: said once, in the title
        values = {str(r.get(c)) for r in rows}
        if c in cols and len(values) == 1:
            cols.remove(c)
            title += f", {LAYER_COLUMNS[c][0]} {values.pop()}"
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
        "pattern": 12,
        "sparsity": 8,
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
        "method",
        "pattern",
        "allocation",
        "sparsity",
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


def totals_line(rows: list[dict[str, Any]]) -> str:
    """One line of totals under a stage's layer table: losses, and sparsity for prune."""
    tot = {k: sum(r[k] for r in rows if r.get(k) is not None) for k in LOSS_PAIRS_KEYS}
    parts = []
    for new, base, label in LOSS_PAIRS:
        if tot[base] and not any(new in r for r in rows):
            parts.append(f"total {label[1]} loss {tot[base]:.4g}")
        elif tot[base]:
            parts.append(
                f"total {label[0]} loss {tot[new]:.4g}, {label[1]} loss {tot[base]:.4g}, "
                f"ratio {tot[new] / tot[base]:.3f}"
            )
    sized = [r for r in rows if "sparsity" in r and r.get("shape")]
    if sized:
        n = sum(r["shape"][0] * r["shape"][1] for r in sized)
        z = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in sized)
        objective = sized[0].get("objective")
        parts.insert(
            0,
            f"sparsity {z / n:.4f} over {len(sized)} layers"
            + (f" ({objective} objective)" if objective else ""),
        )
    return "; ".join(parts)


LOSS_PAIRS = [
    ("gptq_loss", "rtn_loss", ("gptq", "rtn")),
    ("obs_loss", "magnitude_loss", ("obs", "magnitude")),
]
LOSS_PAIRS_KEYS = [k for a, b, _ in LOSS_PAIRS for k in (a, b)]


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
        msg = totals_line(rows)
        if msg:
            console.print(msg)
    console.print(totals_table(data))
    return data
