"""prune stage end to end: patterns, the magnitude baseline, joint sparsity + GPTQ."""

import json

import torch

from sotool.tensorio import load_shards
from tests.test_pipeline import compress

RECIPE = """
model: {model}
calibration: {{source: pydoc, samples: 8, seqlen: 32, batch_size: 4}}
stages:
  - calibrate: {{}}
  - hessians: {{}}
  - prune: {{method: {method}, sparsity: 0.5, pattern: "{pattern}"}}
{extra}
  - evaluate: {{span: [0.5, 1.0], windows: 4, seqlen: 32}}
  - export: {{format: dense}}
"""


def run(tiny_models, write_recipe, tmp_path, method, pattern, extra="", kind="llama"):
    recipe = write_recipe(
        RECIPE.format(model=tiny_models[kind], method=method, pattern=pattern, extra=extra)
    )
    out = tmp_path / f"{method}-{pattern.replace(':', '')}-{bool(extra)}"
    return compress(recipe, out), out


def test_sparsegpt_2_4_exported_zeros(tiny_models, write_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    res, out = run(tiny_models, write_recipe, tmp_path, "sparsegpt", "2:4")
    summ = res["stages"][2]["summary"]
    assert abs(summ["sparsity"] - 0.5) < 1e-6 and summ["ratio"] < 1.0
    masks = load_shards(next((out / "stages").glob("prune-*")), "masks")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    params = dict(model.named_parameters())
    for name, m in masks.items():
        w = params[f"{name}.weight"]
        assert torch.equal(w == 0, m.bool()), name  # exactly the zeros the mask says
        assert (m.view(m.shape[0], -1, 4).sum(-1) == 2).all()


def test_magnitude_and_joint_gptq(tiny_models, write_recipe, tmp_path):
    mag, _ = run(tiny_models, write_recipe, tmp_path, "magnitude", "unstructured")
    sgpt, _ = run(tiny_models, write_recipe, tmp_path, "sparsegpt", "unstructured")
    assert mag["stages"][2]["summary"]["ratio"] == 1.0
    assert sgpt["stages"][2]["summary"]["obs_loss"] < mag["stages"][2]["summary"]["obs_loss"]
    joint, out = run(
        tiny_models,
        write_recipe,
        tmp_path,
        "sparsegpt",
        "unstructured",
        extra="  - gptq: {bits: 4, group_size: 32}",
    )
    masks = load_shards(next((out / "stages").glob("prune-*")), "masks")
    weights = load_shards(next((out / "stages").glob("gptq-*")), "weights")
    for name, m in masks.items():
        w = weights[f"{name}.weight"]
        assert (w[m.bool()] == 0).all()  # pruned weights stay exactly zero
    rep = json.loads(json.dumps(joint["stages"][3]["summary"]))
    assert rep["layers"] == len(masks)
