"""Mixed precision on SmolLM2-135M: searched 3.5-bit allocations against uniform W3/W4 and
random allocations of the same byte size, and which sensitivity metric predicts best.

Calibration: 64 × 512 tokens from the first 80% of WikiText-2 validation; perplexity on
its last 40 × 512 tokens. One pipeline run (recipes/smollm2-mixed-3.5bit.yaml:
sensitivity → search → gptq → evaluate) gives the Hessian cache, the sensitivity metrics
and the end-to-end searched result; the other allocations (uniform W3/W4, the search
with each metric, random allocations of exactly the same bytes) are evaluated in one
process from the same cached-Hessian GPTQ weights (see `Bench`), and the per-layer
damage (ΔNLL when only that layer is at 3 bits) is measured on a subset of layers.
Results accumulate in OUT/results.json (rerunning resumes).

    python benchmarks/bench_mixed.py                       # 30-60 minutes on 2 cores
    python benchmarks/bench_mixed.py --damage-layers 0     # skip the per-layer damage
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


def wait_for(pattern: str, root: Path) -> Path:
    """The first path matching `pattern` under root, waiting for a running pipeline."""
    while True:
        hits = sorted(root.glob(pattern))
        if hits:
            return hits[0]
        time.sleep(20)


class Bench:
    """Allocations evaluated in one process: every layer's GPTQ weights at each candidate
    grid are solved once from the shared Hessian cache (the gptq stage in cache mode
    solves each layer independently, so a mixed allocation's weights are exactly these),
    then each allocation is a weight swap and one perplexity measurement."""

    def __init__(
        self, hess_dir: Path, cands: list[tuple[int, int]], out: Path, windows: int
    ) -> None:
        from safetensors.torch import load_file, save_file

        from sotool.models.loading import load_model, load_tokenizer, resolve_model
        from sotool.stages._quant import target_layers
        from sotool.stages.evaluate import EvaluateParams, eval_windows
        from sotool.stages.gptq import GPTQParams, solve_cached
        from sotool.stages.hessians import HessianStore

        ref = resolve_model("smollm2-135m")
        self.model = load_model(ref)
        self.tok = load_tokenizer(ref)
        self.test = eval_windows(
            EvaluateParams(data=str(WIKI), span=(0.8, 1.0), windows=windows), self.tok
        )
        self.layers = target_layers(self.model)
        self.weights: dict[str, dict[str, object]] = {}
        for b, g in cands:
            cached = out / f"weights-w{b}g{g}.safetensors"  # solved once, kept across restarts
            if cached.exists():
                self.weights[f"w{b}g{g}"] = dict(load_file(str(cached)))
                continue
            gp = GPTQParams(bits=b, group_size=g, hessians="cache")
            spec = gp.spec_for("")
            got: dict[str, object] = {}

            def keep(res: dict, _r: object, _s: object, got: dict = got) -> None:
                got.update({n: r.weight for n, r in res.items()})

            t0 = time.perf_counter()
            solve_cached(self.layers, HessianStore(hess_dir), lambda n, s=spec: s, gp, keep)
            log(f"solved w{b}g{g} in {time.perf_counter() - t0:.1f} s")
            save_file({k: v.contiguous() for k, v in got.items()}, str(cached))
            self.weights[f"w{b}g{g}"] = got

    def ppl(self, alloc: dict[str, str], windows: object | None = None) -> dict:
        """Perplexity with layer -> label weights (layers not named stay original)."""
        import torch

        from sotool.evaluation import perplexity
        from sotool.stages._quant import param_layout

        saved = {}
        with torch.no_grad():
            for n, lab in alloc.items():
                mod = self.layers[n]
                saved[n] = mod.weight.detach().clone()
                mod.weight.copy_(param_layout(mod, self.weights[lab][n]))
        try:
            return perplexity(self.model, self.test if windows is None else windows)
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    self.layers[n].weight.copy_(w)


def searched(sens: dict, metric: str, avg_bits: float) -> dict[str, str]:
    """The search stage's allocation for `metric` (same code path)."""
    from sotool.algos.search import allocate
    from sotool.stages.search import SearchParams, _budget, _problem

    params = SearchParams(metric=metric, budget={"avg_bits": avg_bits})
    names, cands, costs, sizes, _ = _problem(sens, params)
    best = allocate(costs, sizes, _budget(params, sens))
    return {n: cands[j]["label"] for n, j in zip(names, best.choice, strict=True)}


def shuffled(alloc: dict[str, str], seed: int) -> dict[str, str]:
    """The same labels shuffled among layers of the same kind (q_proj, ..., same shape in
    SmolLM2): identical byte size and code bits, random placement."""
    rng = random.Random(seed)
    groups: dict[str, list[str]] = {}
    for n in alloc:
        groups.setdefault(n.split(".")[-1], []).append(n)
    out = {}
    for names in groups.values():
        labels = [alloc[n] for n in names]
        rng.shuffle(labels)
        out.update(zip(names, labels, strict=True))
    return out


def alloc_bytes(sens: dict, alloc: dict[str, str]) -> int:
    return sum(sens["layers"][n]["bytes"][lab] for n, lab in alloc.items())


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
    ap.add_argument("--damage-layers", type=int, default=30, help="layers to measure (0: none)")
    ap.add_argument("--damage-windows", type=int, default=8, help="512-token windows per layer")
    ap.add_argument("--skip-pipeline", action="store_true", help="a pipeline run is under way")
    ap.add_argument("--eval-windows", type=int, default=40, help="last N 512-token windows")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SOTOOL_CACHE", "/tmp/sotool-cache")
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}

    def save() -> None:
        res_path.write_text(json.dumps(results, indent=2))

    run = out / "searched-layerwise"
    if not args.skip_pipeline and "pipeline" not in results:
        log("pipeline: sensitivity -> search -> gptq -> evaluate ...")
        r = compress(RECIPE, run, data_sets(WIKI))
        results["pipeline"] = {
            "ppl": stage(r, "evaluate")["summary"]["ppl"],
            "original_ppl": stage(r, "evaluate")["summary"]["original_ppl"],
            "search": stage(r, "search")["summary"],
            "stage_seconds": {s["name"]: s["seconds"] for s in r["stages"]},
        }
        save()
    hess = wait_for("stages/hessians-*/index.json", run).parent
    bench = Bench(hess, [(3, 64), (4, 64)], out, args.eval_windows)
    results["eval_windows"] = args.eval_windows
    names = list(bench.layers)
    for lab in ("w3g64", "w4g64"):
        key = f"uniform-{lab}"
        if key not in results:
            results[key] = bench.ppl(dict.fromkeys(names, lab))
            save()
        log(f"{key}: ppl {results[key]['ppl']:.3f}")
    sens_dir = wait_for("stages/sensitivity-*/sensitivity.json", run).parent
    sens = json.loads((sens_dir / "sensitivity.json").read_text())
    results["sensitivity_info"] = sens["info"]
    allocs = {}
    for metric in args.metrics.split(","):
        allocs[metric] = searched(sens, metric, 3.5)
        key = f"searched-{metric}"
        if key not in results:
            results[key] = bench.ppl(allocs[metric])
            results[key]["bytes"] = alloc_bytes(sens, allocs[metric])
            results[key]["w4_layers"] = sum(v == "w4g64" for v in allocs[metric].values())
            save()
        log(f"{key}: ppl {results[key]['ppl']:.3f}")
    for seed in range(args.random):
        key = f"random-{seed}"
        if key not in results:
            a = shuffled(allocs["layerwise"], seed)
            results[key] = bench.ppl(a)
            results[key]["bytes"] = alloc_bytes(sens, a)
            assert results[key]["bytes"] == results["searched-layerwise"]["bytes"]
            save()
        log(f"{key}: ppl {results[key]['ppl']:.3f}")
    if args.damage_layers and "damage" not in results:
        from sotool.calib import sources

        stream = sources.tokenize_stream(sources.read_text(str(WIKI), "text", "b"), bench.tok)
        win = sources.consecutive_windows(
            sources.span_of(stream, (0.0, 0.8)), args.damage_windows, 512, "b"
        )
        t0 = time.perf_counter()
        base = bench.ppl({}, win)["nll"]
        # a seeded sample across blocks and layer kinds (a fixed stride would hit one kind)
        picked = sorted(random.Random(0).sample(names, min(args.damage_layers, len(names))))
        delta = {}
        for n in picked:
            delta[n] = bench.ppl({n: "w3g64"}, win)["nll"] - base
            log(f"damage {n}: {delta[n]:.5f}")
        results["damage"] = {
            "base_nll": base,
            "windows": args.damage_windows,
            "delta_nll": delta,
            "seconds": time.perf_counter() - t0,
        }
        save()
    d = results.get("damage", {}).get("delta_nll", {})
    if d:
        corr = {}
        for m in sens["metrics"]:
            pairs = [(sens["layers"][n]["cost"][m].get("w3g64"), v) for n, v in d.items()]
            pairs = [(p, v) for p, v in pairs if p is not None]
            if len(pairs) >= 3:
                corr[m] = spearman([p for p, _ in pairs], [v for _, v in pairs])
        pairs = [(sens["layers"][n]["rtn_loss"]["w3g64"], v) for n, v in d.items()]
        corr["layerwise (RTN objective)"] = spearman([p for p, _ in pairs], [v for _, v in pairs])
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
    info = sens["info"].items()
    print("metric seconds:", {m: i.get("seconds") for m, i in info if isinstance(i, dict)})
    if "spearman" in results:
        print("Spearman(predicted w3g64 cost, measured ΔNLL):", results["spearman"])


if __name__ == "__main__":
    main()
