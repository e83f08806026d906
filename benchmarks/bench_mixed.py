"""Mixed precision on SmolLM2-135M: searched 3.5-bit allocations against uniform W3/W4 and
random allocations of the same byte size, and which sensitivity metric predicts best.

Calibration: 64 × 512 tokens from the first 80% of WikiText-2 validation; perplexity on
its last 40 × 512 tokens. All runs share one Hessian cache (sibling run directories
reuse completed stages). Results accumulate in OUT/results.json (rerunning resumes).

    python benchmarks/bench_mixed.py                       # about 40 minutes on 2 cores
    python benchmarks/bench_mixed.py --damage-layers 0     # skip the per-layer damage
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
RECIPE = ROOT / "recipes" / "smollm2-mixed-3.5bit.yaml"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def data_sets(wiki: Path) -> list[str]:
    return [
        f"calibration.source={wiki}",
        f"evaluate.data={wiki}",
        "evaluate.span=[0.8, 1.0]",
        "evaluate.windows=40",
    ]


def compress(recipe: Path, run: Path, sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "sotool.cli", "compress", str(recipe), "-o", str(run), "--json"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"failed: {' '.join(cmd)}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall"] = time.perf_counter() - t0
    return res


def stage(res: dict, name: str) -> dict:
    return next(s for s in res["stages"] if s["name"] == name)


def uniform_recipe(out: Path) -> Path:
    """The mixed recipe without sensitivity/search (gptq bits from --set)."""
    import yaml

    data = yaml.safe_load(RECIPE.read_text())
    data["stages"] = [
        s for s in data["stages"] if next(iter(s)) not in ("sensitivity", "search", "export")
    ]
    path = out / "uniform.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def random_recipe(out: Path, alloc: dict, seed: int) -> tuple[Path, int]:
    """Gptq with the searched labels shuffled among layers of the same kind (and shape): the same
    byte size exactly, a random placement."""
    import yaml

    rng = random.Random(seed)
    layers = alloc["layers"]
    groups: dict[str, list[str]] = {}
    for n in layers:
        groups.setdefault(n.split(".")[-1], []).append(n)
    overrides, total = [], 0
    for names in groups.values():
        labels = [(layers[n]["bits"], layers[n]["group_size"], layers[n]["bytes"]) for n in names]
        rng.shuffle(labels)
        for n, (b, g, _) in zip(names, labels, strict=True):
            overrides.append({"pattern": f"^{re.escape(n)}$", "bits": b, "group_size": g})
        total += sum(x[2] for x in labels)
    data = yaml.safe_load(uniform_recipe(out).read_text())
    for s in data["stages"]:
        if "gptq" in s:
            s["gptq"]["overrides"] = overrides
    path = out / f"random{seed}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, total


def damage(out: Path, sens_dir: Path, hess_dir: Path, n_layers: int, windows: int) -> dict:
    """Measured NLL increase when only one layer is GPTQ-quantized to 3 bits (g64)."""
    import torch

    from sotool.calib import sources
    from sotool.evaluation import perplexity
    from sotool.models.loading import load_model, load_tokenizer, resolve_model
    from sotool.rundir import read_json
    from sotool.stages._quant import param_layout, target_layers
    from sotool.stages.gptq import GPTQParams, solve_cached
    from sotool.stages.hessians import HessianStore

    ref = resolve_model("smollm2-135m")
    model = load_model(ref)
    tok = load_tokenizer(ref)
    stream = sources.tokenize_stream(sources.read_text(str(WIKI), "text", "bench"), tok)
    # held-out windows from the end of the calibration span (not the test windows)
    ev = sources.consecutive_windows(sources.span_of(stream, (0.0, 0.8)), windows, 512, "b")
    sens = read_json(sens_dir / "sensitivity.json")["layers"]
    names = list(sens)
    step = max(1, len(names) // n_layers)
    chosen = names[::step][:n_layers]
    layers = {n: m for n, m in target_layers(model).items() if n in chosen}
    quant: dict[str, torch.Tensor] = {}
    gp = GPTQParams(bits=3, group_size=64, hessians="cache")
    spec = gp.spec_for(chosen[0])

    def keep(results, _rows, _spec) -> None:
        for n, r in results.items():
            quant[n] = r.weight

    solve_cached(layers, HessianStore(hess_dir), lambda n: spec, gp, keep)
    base = perplexity(model, ev)["nll"]
    out_rows = {}
    for n in chosen:
        mod = layers[n]
        orig = mod.weight.detach().clone()
        with torch.no_grad():
            mod.weight.copy_(param_layout(mod, quant[n]))
        out_rows[n] = perplexity(model, ev)["nll"] - base
        with torch.no_grad():
            mod.weight.copy_(orig)
        log(f"damage {n}: {out_rows[n]:.5f}")
    return {"base_nll": base, "windows": windows, "delta_nll": out_rows}


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    def ranks(x: list[float]) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/mixed-runs", help="folder for run directories")
    ap.add_argument("--metrics", default="layerwise,trace,fisher", help="searched metrics")
    ap.add_argument("--random", type=int, default=5, help="random allocations")
    ap.add_argument("--damage-layers", type=int, default=21, help="layers to measure (0: none)")
    ap.add_argument("--damage-windows", type=int, default=8, help="512-token windows per layer")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SOTOOL_CACHE", "/tmp/sotool-cache")
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}

    def save() -> None:
        res_path.write_text(json.dumps(results, indent=2))

    sets = data_sets(WIKI)
    for metric in args.metrics.split(","):
        key = f"searched-{metric}"
        if key not in results:
            log(f"{key} ...")
            r = compress(RECIPE, out / key, [*sets, f"search.metric={metric}"])
            sens = stage(r, "sensitivity")
            results[key] = {
                "ppl": stage(r, "evaluate")["summary"]["ppl"],
                "search": stage(r, "search")["summary"],
                "sensitivity_seconds": sens["summary"]["seconds"],
                "sensitivity_stage_seconds": sens["seconds"],
                "wall": r["wall"],
            }
            save()
        log(f"{key}: ppl {results[key]['ppl']:.3f}")
    uni = uniform_recipe(out)
    for b in (3, 4):
        key = f"uniform-w{b}g64"
        if key not in results:
            r = compress(uni, out / key, [*sets, f"gptq.bits={b}", "gptq.group_size=64"])
            results[key] = {"ppl": stage(r, "evaluate")["summary"]["ppl"], "wall": r["wall"]}
            save()
        log(f"{key}: ppl {results[key]['ppl']:.3f}")
    first = f"searched-{args.metrics.split(',')[0]}"
    alloc_dir = next((out / first / "stages").glob("search-*"))
    alloc = json.loads((alloc_dir / "allocation.json").read_text())
    for seed in range(args.random):
        key = f"random-{seed}"
        if key not in results:
            path, total = random_recipe(out, alloc, seed)
            assert total == alloc["total_bytes"], (total, alloc["total_bytes"])
            r = compress(path, out / key, sets)
            results[key] = {"ppl": stage(r, "evaluate")["summary"]["ppl"], "bytes": total}
            save()
        log(f"{key}: ppl {results[key]['ppl']:.3f}")
    if args.damage_layers and "damage" not in results:
        sens_dir = next((out / first / "stages").glob("sensitivity-*"))
        hess_dir = next((out / first / "stages").glob("hessians-*"))
        t0 = time.perf_counter()
        results["damage"] = damage(out, sens_dir, hess_dir, args.damage_layers, args.damage_windows)
        results["damage"]["seconds"] = time.perf_counter() - t0
        save()
    if "damage" in results:
        sens_dir = next((out / first / "stages").glob("sensitivity-*"))
        sens = json.loads((sens_dir / "sensitivity.json").read_text())["layers"]
        d = results["damage"]["delta_nll"]
        corr = {}
        for m in ("layerwise", "trace", "fisher", "eigen"):
            pairs = [(sens[n]["cost"].get(m, {}).get("w3g64"), v) for n, v in d.items()]
            pairs = [(p, v) for p, v in pairs if p is not None]
            if len(pairs) >= 3:
                corr[m] = spearman([p for p, _ in pairs], [v for _, v in pairs])
        pairs = [(sens[n]["rtn_loss"]["w3g64"], v) for n, v in d.items()]
        corr["layerwise_rtn"] = spearman([p for p, _ in pairs], [v for _, v in pairs])
        results["spearman"] = corr
        save()
    rand = [results[f"random-{s}"]["ppl"] for s in range(args.random) if f"random-{s}" in results]
    mid = (results["uniform-w3g64"]["ppl"] + results["uniform-w4g64"]["ppl"]) / 2
    print(f"{'config':<22}{'ppl':>10}")
    for k, v in results.items():
        if isinstance(v, dict) and "ppl" in v:
            print(f"{k:<22}{v['ppl']:>10.3f}")
    print(f"{'W3/W4 midpoint':<22}{mid:>10.3f}")
    if rand:
        print(f"random: best {min(rand):.3f}, worst {max(rand):.3f}")
    if "spearman" in results:
        print("Spearman(predicted w3g64 cost, measured ΔNLL):", results["spearman"])


if __name__ == "__main__":
    main()
