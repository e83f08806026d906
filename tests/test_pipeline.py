"""End to end through the CLI on tiny seeded models: runs, resume, reruns, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sotool.cli import app
from sotool.tensorio import load_shards

RECIPE = """
model: {model}
seed: 0
calibration: {{source: pydoc, span: [0, 0.5], samples: 8, seqlen: 32, batch_size: 4}}
stages:
  - calibrate: {{}}
  - hessians: {{}}
  - gptq: {{bits: 4, group_size: 32, hessians: {mode}}}
  - evaluate: {{data: pydoc, span: [0.5, 1.0], windows: 4, seqlen: 32}}
  - export: {{format: dense}}
"""


def cli(*args: str):
    res = CliRunner().invoke(app, list(args))
    return res


def compress(recipe: Path, out: Path, *extra: str) -> dict:
    res = cli("compress", str(recipe), "-o", str(out), "--json", *extra)
    assert res.exit_code == 0, res.stderr + str(res.exception)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2", "bert"])
def test_compress_end_to_end(kind, tiny_models, write_recipe, tmp_path):
    from transformers import AutoModel

    recipe = write_recipe(RECIPE.format(model=tiny_models[kind], mode="cache"))
    result = compress(recipe, tmp_path / "run")
    names = [s["name"] for s in result["stages"]]
    assert names == ["calibrate", "hessians", "gptq", "evaluate", "export"]
    ev = result["stages"][3]["summary"]
    gp = result["stages"][2]["summary"]
    assert gp["layers"] > 0 and gp["ratio"] < 1.0  # GPTQ beats RTN on the layer objective
    if kind == "bert":
        assert ev["kind"] == "fidelity" and 0.5 < ev["cosine"] < 1.0
    else:
        assert ev["kind"] == "perplexity" and ev["ppl"] > 1 and ev["original_ppl"] > 1
        assert ev["ppl"] != ev["original_ppl"]
    # the export loads with transformers and carries the quantized weights
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "config.json").exists() and (model_dir / "sotool_recipe.yaml").exists()
    loaded = AutoModel.from_pretrained(model_dir)
    stage_dir = next((tmp_path / "run" / "stages").glob("gptq-*"))
    saved = load_shards(stage_dir, "weights")
    sd = loaded.state_dict()
    for name, w in saved.items():
        short = name.split(".", 1)[1] if name not in sd else name
        key = name if name in sd else short
        assert torch.equal(sd[key], w), name
    # the weights are exactly the stored 4-bit codes dequantized by their groups
    q = load_shards(stage_dir, "quant")
    for name, w in saved.items():
        layer = name[: -len(".weight")]
        codes, g_idx = q[f"{layer}.codes"], q[f"{layer}.g_idx"].long()
        assert int(codes.max()) <= 15 and int(g_idx.max()) + 1 == q[f"{layer}.scale"].shape[1]
        deq = q[f"{layer}.scale"][:, g_idx] * (codes.float() - q[f"{layer}.zero"][:, g_idx])
        w_out_in = w.t() if kind == "gpt2" else w
        assert torch.equal(deq, w_out_in), layer


def test_rerun_skips_and_late_change_reruns_only_it(tiny_models, write_recipe, tmp_path):
    recipe = write_recipe(RECIPE.format(model=tiny_models["llama"], mode="cache"))
    first = compress(recipe, tmp_path / "run")
    assert [s["action"] for s in first["stages"]] == ["ran"] * 5
    again = compress(recipe, tmp_path / "run")
    assert [s["action"] for s in again["stages"]] == ["skipped"] * 5
    late = compress(recipe, tmp_path / "run", "--set", "evaluate.windows=3")
    assert [s["action"] for s in late["stages"]] == ["skipped"] * 3 + ["ran"] * 2
    mid = compress(recipe, tmp_path / "run", "--set", "gptq.bits=3")
    assert [s["action"] for s in mid["stages"]] == ["skipped"] * 2 + ["ran"] * 3
    assert mid["stages"][3]["summary"]["ppl"] != first["stages"][3]["summary"]["ppl"]
    # a sibling run directory reuses completed stages instead of recomputing them
    sib = compress(recipe, tmp_path / "sibling", "--set", "gptq.bits=3")
    assert [s["action"] for s in sib["stages"]] == ["reused"] * 5
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["version"] and all(s["status"] == "done" for s in manifest["stages"])


def test_interrupted_run_resumes_identically(tiny_models, write_recipe, tmp_path):
    recipe = write_recipe(RECIPE.format(model=tiny_models["llama"], mode="sequential"))
    env = {**os.environ, "SOTOOL_KILL_IN": "gptq"}
    cmd = [
        sys.executable,
        "-m",
        "sotool.cli",
        "compress",
        str(recipe),
        "-o",
        str(tmp_path / "killed"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9  # killed mid-stage, after writing, before committing
    stages = tmp_path / "killed" / "stages"
    assert not list(stages.glob("gptq-*"))  # nothing half-written in place
    assert list(stages.glob(".tmp-gptq-*"))  # the unfinished work is only in a temp folder
    resumed = compress(recipe, tmp_path / "killed")
    assert [s["action"] for s in resumed["stages"]] == ["skipped"] * 2 + ["ran"] * 3
    assert not list(stages.glob(".tmp-*"))
    clean = compress(recipe, tmp_path / "clean")
    a = load_shards(next(stages.glob("gptq-*")), "weights")
    b = load_shards(next((tmp_path / "clean" / "stages").glob("gptq-*")), "weights")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["stages"][3]["summary"]["ppl"] == clean["stages"][3]["summary"]["ppl"]


def test_evaluate_matches_direct_perplexity(tiny_models, write_recipe, tmp_path):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(RECIPE.format(model=tiny_models["llama"], mode="cache"))
    res = compress(recipe, tmp_path / "run")
    ev = res["stages"][3]["summary"]
    windows = load_file(
        str(next((tmp_path / "run" / "stages").glob("evaluate-*")) / "windows.safetensors")
    )["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logp = F.log_softmax(model(ids[None]).logits[0, :-1].double(), -1)
            nll -= float(logp.gather(1, ids[1:, None]).sum())
            n += ids.numel() - 1
    assert abs(ev["ppl"] - float(torch.tensor(nll / n).exp())) < 1e-3 * ev["ppl"]
    # the CLI's eval command gives the same number for the run directory
    out = cli(
        "eval",
        str(tmp_path / "run"),
        "--data",
        "pydoc",
        "--span",
        "0.5,1",
        "--windows",
        "4",
        "--seqlen",
        "32",
        "--json",
    )
    assert out.exit_code == 0, out.stderr
    assert abs(json.loads(out.stdout)["ppl"] - ev["ppl"]) < 1e-4 * ev["ppl"]


def test_hessians_equal_direct_accumulation(tiny_models, write_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    from sotool.stages.hessians import HessianStore

    recipe = write_recipe(RECIPE.format(model=tiny_models["opt"], mode="cache"))
    compress(recipe, tmp_path / "run")
    store = HessianStore(next((tmp_path / "run" / "stages").glob("hessians-*")))
    tokens = load_file(
        str(next((tmp_path / "run" / "stages").glob("calibrate-*")) / "tokens.safetensors")
    )["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_models["opt"]).eval()
    xs = {}
    layer = model.model.decoder.layers[1]
    hooks = [
        m.register_forward_hook(lambda m, a, o, n=n: xs.setdefault(n, []).append(a[0]))
        for n, m in [("fc2", layer.fc2), ("k", layer.self_attn.k_proj)]
    ]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    for short, full in [
        ("fc2", "model.decoder.layers.1.fc2"),
        ("k", "model.decoder.layers.1.self_attn.k_proj"),
    ]:
        x = torch.cat(xs[short]).reshape(-1, xs[short][0].shape[-1])
        s, n = store.get(full)
        assert n == x.shape[0]
        assert torch.allclose(s, x.T @ x, rtol=1e-4, atol=1e-3)
    # q/k/v share one matrix on disk
    assert store.input_key("model.decoder.layers.1.self_attn.q_proj") == store.input_key(
        "model.decoder.layers.1.self_attn.v_proj"
    )


def test_sequential_and_cache_agree_on_first_block(tiny_models, write_recipe, tmp_path):
    recipe = write_recipe(RECIPE.format(model=tiny_models["llama"], mode="cache"))
    # the same solver both ways (refit's default differs between the modes)
    compress(recipe, tmp_path / "a", "--set", "gptq.refit=1")
    compress(recipe, tmp_path / "b", "--set", "gptq.hessians=sequential", "--set", "gptq.refit=1")
    wa = load_shards(next((tmp_path / "a" / "stages").glob("gptq-*")), "weights")
    wb = load_shards(next((tmp_path / "b" / "stages").glob("gptq-*")), "weights")
    first = [k for k in wa if ".layers.0.self_attn." in k and "o_proj" not in k]
    assert first and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in first)
    later = [k for k in wa if ".layers.1." in k]
    assert any(not torch.equal(wa[k], wb[k]) for k in later)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: t.replace("- gptq:", "- gtpq:"), "unknown stage 'gtpq'"),
        (lambda t: t.replace("bits: 4", "bits: 'x'"), "gptq.bits"),
        (lambda t: t.replace("model: ", "model: ./no/such/dir"), "not found"),
        (lambda t: t.replace("source: pydoc", "source: /no/such/file.txt"), "calibration.source"),
    ],
    ids=["typo", "type", "model-path", "calibration-file"],
)
def test_cli_errors_are_one_line(edit, needle, tiny_models, write_recipe, tmp_path):
    text = RECIPE.format(model=tiny_models["llama"], mode="cache")
    if "no/such/dir" in edit("model: "):
        text = text.replace(f"model: {tiny_models['llama']}", "model: ./no/such/dir")
    else:
        text = edit(text)
    res = cli("compress", str(write_recipe(text)), "-o", str(tmp_path / "run"))
    assert res.exit_code == 1
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_unreadable_calibration_file(tiny_models, write_recipe, tmp_path):
    bad = tmp_path / "secret.txt"
    bad.write_text("text")
    bad.chmod(0)
    if os.access(bad, os.R_OK):  # root reads anything: use a directory instead
        bad = tmp_path
    text = RECIPE.format(model=tiny_models["llama"], mode="cache").replace(
        "source: pydoc", f"source: {bad}"
    )
    res = cli("validate", str(write_recipe(text)))
    assert res.exit_code == 1 and "calibration.source" in res.stderr


def test_stages_and_validate_and_report(tiny_models, write_recipe, tmp_path):
    res = cli("stages", "--json")
    data = json.loads(res.stdout)
    assert data["gptq"]["params"]["group_size"]["default"] == 128
    assert "act_order" in data["gptq"]["params"]
    recipe = write_recipe(RECIPE.format(model=tiny_models["llama"], mode="cache"))
    assert cli("validate", str(recipe)).exit_code == 0
    compress(recipe, tmp_path / "run")
    rep = cli("report", str(tmp_path / "run"), "--json")
    rows = next(s for s in json.loads(rep.stdout)["stages"] if s["name"] == "gptq")["layers"]
    assert {"layer", "gptq_loss", "rtn_loss", "ratio", "damp", "h_trace", "seconds"} <= set(rows[0])
    table = cli("report", str(tmp_path / "run"), "--top", "3")
    assert table.exit_code == 0 and "gptq loss" in table.stdout


@pytest.mark.parametrize("mixed", [False, True])
def test_layer_table_fits_100_columns(mixed):
    """SmolLM2-sized names and values, uniform or mixed grids: nothing cut, ≤ 100 wide."""
    from rich.console import Console

    from sotool.report import layer_table

    rows = []
    for i, (kind, shape) in enumerate(
        [("self_attn.q_proj", [576, 576]), ("mlp.down_proj", [576, 1536])] * 3
    ):
        rows.append(
            {
                "layer": f"model.layers.{10 + i}.{kind}",
                "shape": shape,
                "bits": 2 + i % 3 if mixed else 4,
                "group_size": [32, 64, 128][i % 3] if mixed else 128,
                "h_trace": 12345.678 * (i + 1),
                "gptq_loss": 1234.5678 / (i + 1),
                "rtn_loss": 28934.123 * (i + 1),
                "ratio": 0.0427 * (i + 1),
                "damp": 0.01,
                "seconds": 0.291,
            }
        )
    console = Console(width=100, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(layer_table(rows, "gptq: per layer", "gptq_loss", None))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "…" not in text
    assert "11.mlp.down_proj" in text and "2.89e+04" in text and "λ 0.01" in text
    header = next(line for line in text.splitlines() if "layer" in line and "ratio" in line)
    assert ("bits" in header) == mixed  # a constant grid is said in the title
    assert ("bits 4, group 128" in text) == (not mixed)
