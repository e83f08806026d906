"""Tables (rich, on stderr) and JSON for runs: per-layer results and evaluations."""

from __future__ import annotations

import math
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
    "gptq_loss": ("gptq loss", "{:.3g}"),
    "rtn_loss": ("rtn loss", "{:.3g}"),
    "pattern": ("pattern", "{}"),
    "sparsity": ("sparsity", "{:.3f}"),
    "obs_loss": ("obs loss", "{:.3g}"),
    "magnitude_loss": ("magn. loss", "{:.3g}"),
    "ratio": ("ratio", "{:.3f}"),
    "damp": ("λ", "{:g}"),
    "seconds": ("time s", "{:.2f}"),
}


CONSTANT_IN_TITLE = ("pattern", "bits", "group_size", "damp")


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
    mixed = mixed_data(run_dir)
    print_mixed(mixed, console, sort, top)
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


# -- sensitivity, allocation and frontier ------------------------------------------------

SENS_METRICS = {
    # key in sensitivity.json: (header, what the number is)
    "trace": ("tr(H)/n", "Hutchinson average eigenvalue"),
    "eigen": ("λmax", "top eigenvalue"),
    "fisher": ("fisher/n", "mean empirical Fisher diagonal"),
    "layerwise": ("gptq obj.", "GPTQ layer objective at the lowest candidate"),
}
BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(value: float | None, lo: float, hi: float, width: int = 6) -> str:
    """An inline bar of `width` cells for value on a log scale between lo and hi (> 0)."""
    if value is None or value <= 0 or hi <= 0:
        return " " * width
    if hi <= lo:
        frac = 1.0
    else:
        frac = (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
    eighths = round(max(0.0, min(1.0, frac)) * width * 8)
    eighths = max(eighths, 1)
    full, rest = divmod(eighths, 8)
    return ("█" * full + (BLOCKS[rest] if rest else "")).ljust(width)


def sensitivity_rows(sens: dict[str, Any], alloc: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per layer: each metric's value (layerwise: the objective at the lowest
    candidate) and the searched choice."""
    low = sens["candidates"][0]["label"]
    rows = []
    for n, e in sens["layers"].items():
        r: dict[str, Any] = {"layer": n, "shape": e["shape"]}
        for m in sens["metrics"]:
            r[m] = e["cost"]["layerwise"].get(low) if m == "layerwise" else e.get(m)
        if alloc is not None and n in alloc["layers"]:
            r["choice"] = alloc["layers"][n]["label"]
        rows.append(r)
    return rows


def _order(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def sensitivity_table(
    rows: list[dict[str, Any]], metrics: list[str], sort: str | None, top: int | None
) -> Table:
    """Every metric per layer with a log-scale bar; sorted by a metric or in model order."""
    if sort in metrics:
        rows = sorted(rows, key=lambda r: (r.get(sort) is None, -(r.get(sort) or 0.0)))
    else:
        rows = sorted(rows, key=lambda r: _order(r["layer"]))
    shown = rows[:top] if top else rows
    t = Table(
        title="sensitivity per layer (bars: log scale per column)",
        header_style="bold",
        pad_edge=False,
        expand=False,
    )
    t.add_column("layer", no_wrap=True, overflow="ellipsis", max_width=18)
    ranges = {}
    for m in metrics:
        vals = [r[m] for r in rows if r.get(m) is not None and r[m] > 0]
        ranges[m] = (min(vals), max(vals)) if vals else (0.0, 0.0)
        t.add_column(SENS_METRICS[m][0], justify="left", no_wrap=True)
    has_choice = any("choice" in r for r in rows)
    if has_choice:
        t.add_column("chosen", no_wrap=True)
    for r in shown:
        cells = [short_layer(r["layer"]).replace("self_attn.", "attn.").replace("mlp.", "")]
        for m in metrics:
            v = r.get(m)
            cells.append(f"{_fmt(v, '{:8.2e}'):>8} {bar(v, *ranges[m])}")
        if has_choice:
            cells.append(r.get("choice", "-"))
        t.add_row(*cells)
    if len(rows) > len(shown):
        t.caption = f"{len(shown)} of {len(rows)} layers (sorted by {sort or 'model order'})"
    return t


def frontier_table(front: list[dict[str, Any]], alloc: dict[str, Any], points: int = 12) -> Table:
    """A sample of the Pareto frontier (size vs predicted cost), the chosen point marked."""
    idx = sorted({round(i * (len(front) - 1) / max(points - 1, 1)) for i in range(points)})
    chosen = max(
        (i for i, p in enumerate(front) if p["bytes"] <= alloc["total_bytes"]),
        default=0,
        key=lambda i: front[i]["size"],
    )
    idx = sorted(set(idx) | {chosen})
    costs = [p["cost"] for p in front if p["cost"] > 0]
    lo, hi = (min(costs), max(costs)) if costs else (0.0, 0.0)
    t = Table(
        title=f"Pareto frontier ({len(front)} points; predicted {alloc['metric']} cost)",
        header_style="bold",
        pad_edge=False,
    )
    t.add_column("avg bits", justify="right")
    t.add_column("MiB", justify="right")
    t.add_column("predicted cost", no_wrap=True)
    t.add_column("choices", overflow="ellipsis", max_width=36)
    t.add_column("", no_wrap=True)
    for i in idx:
        p = front[i]
        t.add_row(
            f"{p['avg_bits']:.3f}",
            f"{p['bytes'] / 2**20:.2f}",
            f"{p['cost']:9.3e} {bar(p['cost'], lo, hi, 10)}",
            ", ".join(f"{k}×{v}" for k, v in p["counts"].items()),
            "◀ chosen" if i == chosen else "",
        )
    return t


def mixed_data(run_dir: str | Path) -> dict[str, Any]:
    """The run's sensitivity, allocation and frontier (each None when absent)."""
    _, _, recs = load_run(run_dir)
    out: dict[str, Any] = {"sensitivity": None, "allocation": None, "frontier": None}
    for r in recs:
        if r.name == "sensitivity":
            out["sensitivity"] = read_json(r.dir / "sensitivity.json")
        if r.name == "search":
            out["allocation"] = read_json(r.dir / "allocation.json")
            out["frontier"] = read_json(r.dir / "frontier.json")
    return out


def print_mixed(data: dict[str, Any], console: Console, sort: str | None, top: int | None) -> None:
    sens, alloc, front = data["sensitivity"], data["allocation"], data["frontier"]
    if sens is not None:
        rows = sensitivity_rows(sens, alloc)
        console.print(sensitivity_table(rows, sens["metrics"], sort, top))
        times = ", ".join(
            f"{m} {i['seconds']:.1f} s"
            for m, i in sens.get("info", {}).items()
            if isinstance(i, dict) and "seconds" in i
        )
        if times:
            console.print(f"metric time: {times}")
    if alloc is not None:
        counts = ", ".join(f"{k}×{v}" for k, v in alloc["counts"].items())
        console.print(
            f"allocation ({alloc['metric']}, budget {alloc['budget']}): "
            f"{alloc['avg_bits']:.3f} average bits, {alloc['total_bytes'] / 2**20:.2f} MiB, "
            f"predicted cost {alloc['predicted_cost']:.4g}; {counts}"
        )
    if front:
        console.print(frontier_table(front, alloc))


def plot_mixed(data: dict[str, Any], path: str | Path) -> None:
    """Frontier (size vs predicted cost) and per-layer sensitivity, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sens, alloc, front = data["sensitivity"], data["allocation"], data["frontier"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    ax = axes[0]
    if front:
        ax.plot([p["avg_bits"] for p in front], [p["cost"] for p in front], ".-", ms=3)
        ax.plot([alloc["avg_bits"]], [alloc["predicted_cost"]], "r*", ms=14, label="chosen")
        ax.set_yscale("log")
        ax.set_xlabel("average code bits per weight")
        ax.set_ylabel(f"predicted cost ({alloc['metric']})")
        ax.set_title("Pareto frontier")
        ax.legend()
        fwd, inv = _bits_to_mib(front)
        ax.secondary_xaxis("top", functions=(fwd, inv)).set_xlabel("MiB of quantized layers")
    else:
        ax.text(0.5, 0.5, "no search stage in this run", ha="center")
    ax = axes[1]
    if sens is not None:
        rows = sensitivity_rows(sens, alloc)
        x = list(range(len(rows)))
        for m in sens["metrics"]:
            vals = [r.get(m) for r in rows]
            pos = [v for v in vals if v is not None and v > 0]
            if not pos:
                continue
            top_v = max(pos)
            ax.plot(
                x,
                [v / top_v if v and v > 0 else float("nan") for v in vals],
                ".",
                label=SENS_METRICS[m][1],
                ms=4,
            )
        if alloc is not None:
            widest = max(sens["candidates"], key=lambda c: c["bits"])["label"]
            for i in (i for i, r in enumerate(rows) if r.get("choice") == widest):
                ax.axvspan(i - 0.5, i + 0.5, color="orange", alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax.set_xlabel("layer (model order; shaded: got the largest candidate)")
        ax.set_ylabel("sensitivity / max")
        ax.set_title("per-layer sensitivity")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bits_to_mib(front: list[dict[str, Any]]) -> tuple[Any, Any]:
    """avg bits <-> MiB, linear through the frontier's end points (for a second axis)."""
    p, q = front[0], front[-1]
    db = q["avg_bits"] - p["avg_bits"]
    slope = (q["bytes"] - p["bytes"]) / 2**20 / db if db else 1.0
    m0 = p["bytes"] / 2**20

    def fwd(x: Any) -> Any:
        return m0 + (x - p["avg_bits"]) * slope

    def inv(y: Any) -> Any:
        return p["avg_bits"] + (y - m0) / slope

    return fwd, inv
