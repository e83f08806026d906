"""Load sotool's exports of SmolLM2-135M back with their consumers and compare.

For each variant (W4 g64 sym; mixed 3/4-bit; 2:4 SparseGPT + W4) this runs the recipe
calibrate → hessians → [prune] → gptq (cached Hessians) → evaluate → export ×3
(compressed-tensors float32, compressed-tensors float16, gptq), then:

- loads the compressed-tensors export with transformers' `from_pretrained` (the
  `compressed-tensors` package installed) on CPU, compares its logits on 4 held-out
  windows with sotool's in-memory model, and computes its perplexity on the evaluate
  stage's windows (to compare with the stage's own number);
- unpacks the gptq export and checks the codes against the gptq stage's;
- reports on-disk sizes against the dense float16 size.

Usage (about 15 min per variant on 2 CPU cores):

    SOTOOL_CACHE=/tmp/sotool-cache python benchmarks/check_exports.py \
        --data /work/shared/data/wikitext-2/valid.txt --out /tmp/export-runs \\
        [--variants w4 mixed sparse]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

RECIPE = """
model: smollm2-135m
seed: 0
calibration: {{source: {data}, span: [0.0, 0.8], samples: 64, seqlen: 512}}
stages:
  - calibrate: {{}}
  - hessians: {{}}
{prune}  - gptq: {{bits: 4, group_size: 64, sym: true, hessians: cache{overrides}}}
  - evaluate: {{data: {data}, span: [0.8, 1.0], windows: 40, seqlen: 512}}
  - export: {{format: compressed-tensors, dtype: float32}}
  - export: {{format: compressed-tensors}}
  - export: {{format: gptq}}
"""

VARIANTS = {
    "w4": {"prune": "", "overrides": ""},
    "mixed": {
        "prune": "",
        "overrides": ", overrides: [{pattern: '\\.mlp\\.', bits: 3}]",
    },
    "sparse": {
        "prune": "  - prune: {method: sparsegpt, sparsity: 0.5, pattern: '2:4'}\n",
        "overrides": "",
    },
}


def run_variant(name: str, data: str, out: Path, ppl_fp16: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from sotool.checkpoints import load_quant
    from sotool.evaluation import perplexity
    from sotool.inspect import inspect_dir
    from sotool.pipeline import ModelSession, Runner, load_run
    from sotool.recipe import load_recipe

    recipe = out / f"{name}.yaml"
    recipe.write_text(RECIPE.format(data=data, **VARIANTS[name]))
    run_dir = out / name
    t0 = time.time()
    Runner(load_recipe(recipe, []), run_dir).run()
    _, manifest, recs = load_run(run_dir)
    ev = next(r for r in recs if r.name == "evaluate")
    exports = [r for r in recs if r.name == "export"]
    windows = load_file(str(ev.dir / "windows.safetensors"))["input_ids"]
    session = ModelSession(Runner(load_recipe(recipe, []), run_dir).ref, "float32")
    mine = session.model(recs).eval()
    res: dict = {"variant": name, "pipeline_seconds": round(time.time() - t0, 1)}
    res["evaluate_ppl"] = ev.meta["summary"]["ppl"]
    res["original_ppl"] = ev.meta["summary"].get("original_ppl")
    with torch.no_grad():
        ref = mine(windows[:4]).logits
    for rec, label in zip(exports, ["ct_fp32", "ct_fp16", "gptq"], strict=True):
        d = rec.dir / "model"
        s = rec.meta["summary"]
        entry = {"bytes": s["bytes"], "dense_fp16_bytes": s["dense_fp16_bytes"]}
        entry["ratio_to_fp16"] = round(s["ratio_to_fp16"], 4)
        info = inspect_dir(d, count_zeros=label != "ct_fp16")
        entry["avg_bits"] = info["avg_bits"]
        if label.startswith("ct"):
            loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            with torch.no_grad():
                got = loaded(windows[:4]).logits
            entry["logits_max_abs_diff"] = float((got - ref).abs().max())
            entry["logits_max_abs"] = float(ref.abs().max())
            if label == "ct_fp32" or ppl_fp16:
                entry["ppl"] = perplexity(loaded, windows, batch_size=4)["ppl"]
            del loaded
        else:
            q = load_quant(next(r for r in recs if r.name == "gptq").dir)
            from sotool.algos.formats import from_gptq

            sd = load_file(str(d / "model.safetensors"))
            v1 = json.loads((d / "config.json").read_text())["quantization_config"]
            same = 0
            for n, layer in q.items():
                t = {k: sd[f"{n}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
                codes, _, zero, _ = from_gptq(t, layer.scheme.bits, layer.codes.shape[0])
                same += int(torch.equal(codes, layer.codes.int()) and torch.equal(zero, layer.zero))
            entry["layers_exact"] = f"{same}/{len(q)}"
            entry["checkpoint_format"] = v1["checkpoint_format"]
        if name == "sparse":
            rows = [r for r in info["layers"] if r["format"] != "dense" and r["sparsity"]]
            entry["min_layer_sparsity"] = min(r["sparsity"] for r in rows) if rows else None
        res[label] = entry
        print(json.dumps({name: {label: entry}}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="/tmp/export-runs")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--ppl-fp16", action="store_true", help="also score the float16 export")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_variant(v, a.data, out, a.ppl_fp16) for v in a.variants]
    (out / "check_exports.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
