"""export stage end to end: compressed-tensors and GPTQ exports of a pipeline run, read
back by transformers (compressed-tensors) and by `sotool inspect`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sotool.evaluation import perplexity
from sotool.models.loading import resolve_model
from sotool.pipeline import ModelSession, load_run
from tests.test_pipeline import cli, compress

RECIPE = """
model: {model}
seed: 0
calibration: {{source: pydoc, span: [0, 0.5], samples: 8, seqlen: 32, batch_size: 4}}
stages:
  - calibrate: {{}}
  - hessians: {{}}
{prune}  - gptq: {{bits: 4, group_size: 32, sym: true, hessians: cache{extra}}}
  - evaluate: {{data: pydoc, span: [0.5, 1.0], windows: 4, seqlen: 32}}
  - export: {{format: compressed-tensors, dtype: float32}}
  - export: {{format: gptq}}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One parent folder: the runs share (hard-link) their calibrate/hessians stages."""
    return tmp_path_factory.mktemp("export-runs")


def run(tiny_models, write_recipe, runs, name, prune="", extra=""):
    recipe = write_recipe(RECIPE.format(model=tiny_models["llama"], prune=prune, extra=extra))
    res = compress(recipe, runs / name)
    _, manifest, recs = load_run(runs / name)
    return res, recs


def check_against_memory(recs, run_dir):
    """Logits and perplexity of the transformers-loaded compressed-tensors export equal
    the in-memory model's and the evaluate stage's."""
    from transformers import AutoModelForCausalLM

    _, manifest, _ = load_run(run_dir)
    mine = ModelSession(resolve_model(manifest["recipe"]["model"]), "float32").model(recs)
    ev = next(r for r in recs if r.name == "evaluate")
    windows = load_file(str(ev.dir / "windows.safetensors"))["input_ids"]
    ct = next(r for r in recs if r.name == "export").dir / "model"
    loaded = AutoModelForCausalLM.from_pretrained(ct).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(windows).logits, mine(windows).logits)
    ppl = perplexity(loaded, windows)["ppl"]
    assert abs(ppl - ev.meta["summary"]["ppl"]) < 1e-5 * ppl
    return ct


def test_w4_compressed_tensors_and_gptq(tiny_models, write_recipe, runs):
    res, recs = run(tiny_models, write_recipe, runs, "w4")
    ct = check_against_memory(recs, runs / "w4")
    ex = [s["summary"] for s in res["stages"] if s["name"] == "export"]
    assert ex[0]["format"] == "compressed-tensors" and ex[1]["format"] == "gptq"
    assert ex[1]["ratio_to_fp16"] < ex[0]["ratio_to_fp16"]  # fp16 scales and embeddings
    card = (ct / "README.md").read_text()
    assert "Measured perplexity" in card and "dense in float16" in card
    for f in ("config.json", "generation_config.json", "tokenizer.json", "sotool_summary.json"):
        assert (ct / f).exists(), f
    gdir = next(r for r in recs if r.name == "export" and r.meta["params"]["format"] == "gptq")
    out = cli("inspect", str(gdir.dir / "model"), "--json")
    assert out.exit_code == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["format"] == "gptq/gptq" and info["quantized_layers"] == 14
    assert {r["bits"] for r in info["layers"] if r["format"] == "gptq"} == {4}


def test_mixed_precision(tiny_models, write_recipe, runs):
    extra = ", overrides: [{pattern: 'mlp', bits: 3}]"
    _, recs = run(tiny_models, write_recipe, runs, "mixed", extra=extra)
    ct = check_against_memory(recs, runs / "mixed")
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    bits = {g["weights"]["num_bits"] for g in qc["config_groups"].values()}
    assert bits == {3, 4}


def test_sparse_24_plus_w4(tiny_models, write_recipe, runs):
    prune = "  - prune: {method: sparsegpt, sparsity: 0.5, pattern: '2:4'}\n"
    _, recs = run(tiny_models, write_recipe, runs, "sparse", prune=prune)
    ct = check_against_memory(recs, runs / "sparse")
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["sparsity_structure"] == "2:4"
    out = cli("inspect", str(ct), "--json")
    rows = [r for r in json.loads(out.stdout)["layers"] if r["format"] != "dense"]
    assert rows and all(r["sparsity"] >= 0.5 for r in rows)


@pytest.mark.parametrize(
    ("stages", "needle"),
    [
        ("  - export: {format: gptq}\n", "needs a quantizing stage"),
        (
            "  - rtn: {bits: 4, group_size: 32}\n"
            "  - prune: {method: magnitude}\n  - export: {format: compressed-tensors}\n",
            "changed the weights after",
        ),
    ],
)
def test_export_errors_are_one_line(stages, needle, tiny_models, write_recipe, tmp_path):
    head = RECIPE.split("stages:")[0].format(model=tiny_models["llama"])
    recipe = write_recipe(head + "stages:\n" + stages)
    res = cli("compress", str(recipe), "-o", str(tmp_path / "r"))
    assert res.exit_code == 1
    line = [x for x in res.stderr.splitlines() if x.strip()][-1]
    assert "error:" in line and needle in line
