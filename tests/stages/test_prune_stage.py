"""prune stage end to end: patterns, the magnitude baseline, joint sparsity + GPTQ."""

import json

import torch

from sotool.tensorio import load_shards
from tests.test_pipeline import cli, compress

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
        RECIPE.format(
            model=tiny_models[kind], method=method, pattern=pattern, extra=extra, evaluate=""
        )
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


OBERT = """
model: {model}
calibration: {{source: pydoc, samples: 8, seqlen: 32, batch_size: 4}}
stages:
  - calibrate: {{}}
  - fisher: {{samples: 8}}
  - prune: {{method: {method}, sparsity: 0.5, pattern: {pattern}, fisher_block: 16{extra}}}
{evaluate}
  - export: {{format: dense}}
"""


def obert_recipe(write_recipe, model, method, pattern, extra="", evaluate=""):
    text = OBERT.format(model=model, method=method, pattern=pattern, extra=extra, evaluate=evaluate)
    return write_recipe(text)


def exported_zeros_match(out, cls):
    model = cls.from_pretrained(out / "model")
    masks = load_shards(next((out / "stages").glob("prune-*")), "masks")
    params = dict(model.named_parameters())
    for name, m in masks.items():
        key = name if f"{name}.weight" in params else name.split(".", 1)[1]
        assert torch.equal(params[f"{key}.weight"] == 0, m.bool()), name
    return model, masks


def test_obert_block4_on_bert_through_cli(tiny_models, write_recipe, tmp_path):
    from transformers import AutoModelForMaskedLM

    ev = "  - evaluate: {span: [0.5, 1.0], windows: 4, seqlen: 32}"
    recipe = obert_recipe(write_recipe, tiny_models["bert"], "obert", "block4", evaluate=ev)
    res = compress(recipe, tmp_path / "bert")
    summ = res["stages"][2]["summary"]
    assert summ["objective"] == "fisher" and summ["ratio"] < 1.0
    assert abs(summ["sparsity"] - 0.5) < 1e-6
    assert res["stages"][1]["summary"]["loss"] == "masked-lm"
    assert 0.5 < res["stages"][3]["summary"]["cosine"] < 1.0
    _, masks = exported_zeros_match(tmp_path / "bert", AutoModelForMaskedLM)
    for m in masks.values():
        g = m.view(m.shape[0], -1, 4).bool()
        assert (g.all(-1) | (~g).all(-1)).all()  # whole groups of 4 along rows


def test_obert_global_allocation_on_llama(tiny_models, write_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "llama"
    extra = ", allocation: global"
    recipe = obert_recipe(write_recipe, tiny_models["llama"], "obert", "unstructured", extra)
    res = compress(recipe, run_dir)
    summ = res["stages"][2]["summary"]
    assert abs(summ["sparsity"] - 0.5) < 1e-3 and summ["ratio"] < 1.0
    rows = json.loads(
        next((run_dir / "stages").glob("prune-*")).joinpath("layers.json").read_text()
    )
    sp = [r["sparsity"] for r in rows]
    assert max(sp) - min(sp) > 0.05  # not uniform
    assert all(abs(r["sparsity"] - r["target_sparsity"]) < 1e-3 for r in rows)
    table = cli("report", str(run_dir), "--sort", "layer")
    assert table.exit_code == 0, table.stderr
    for head in ("pattern unstructured", "sparsity", "obs loss", "magn.", "ratio"):
        assert head in table.stdout, table.stdout
    assert "sparsity 0.50" in table.stdout and "fisher objective" in table.stdout
    original = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    model, _ = exported_zeros_match(run_dir, AutoModelForCausalLM)
    # tied lm_head: pruning never reaches the input embeddings through the tie
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    assert torch.equal(emb, original.get_input_embeddings().weight)
    # a second prune config on the same run reuses the fisher stage; magnitude, global
    mag = compress(recipe, run_dir, "--set", "prune.method=magnitude")
    assert [s["action"] for s in mag["stages"][:2]] == ["skipped", "skipped"]
    assert mag["stages"][2]["summary"]["ratio"] == 1.0


def test_sparsegpt_from_the_cache(tiny_models, write_recipe, tmp_path):
    """The default re-collects Hessians block by block; `hessians: cache` solves every
    layer from the hessians stage, same-shape layers together."""
    recipe = write_recipe(
        RECIPE.format(
            model=tiny_models["llama"], method="sparsegpt", pattern="2:4", extra=""
        ).replace('2:4"}', '2:4", hessians: cache}'),
        "cache.yaml",
    )
    cached = compress(recipe, tmp_path / "cache")
    s = cached["stages"][2]["summary"]
    assert abs(s["sparsity"] - 0.5) < 1e-6 and s["ratio"] < 1.0 and s["objective"] == "hessian"
    seq = compress(
        recipe.parent / "cache.yaml", tmp_path / "seq", "--set", "prune.hessians=sequential"
    )
    q = seq["stages"][2]["summary"]
    assert abs(q["sparsity"] - 0.5) < 1e-6 and q["ratio"] < 1.0
    assert q["obs_loss"] != s["obs_loss"]  # different Hessians after the first block


def test_invalid_combinations(tiny_models, write_recipe, tmp_path):
    for extra, msg in [
        (", allocation: global", "use method obert or magnitude"),
    ]:
        recipe = obert_recipe(
            write_recipe, tiny_models["llama"], "sparsegpt", "unstructured", extra
        )
        res = cli("validate", str(recipe))
        assert res.exit_code == 1 and msg in res.stderr and "prune" in res.stderr
    recipe = obert_recipe(write_recipe, tiny_models["llama"], "obert", "block3")
    res = cli("validate", str(recipe))
    assert res.exit_code == 1 and "fisher_block" in res.stderr
