"""fisher stage: per-sample gradients on disk, equal to a direct backward pass."""

import torch

from sotool.stages.fisher import FisherStore, mlm_inputs
from tests.test_pipeline import cli, compress

RECIPE = """
model: {model}
calibration: {{source: pydoc, samples: 6, seqlen: 24, batch_size: 3}}
stages:
  - calibrate: {{}}
  - fisher: {{samples: {m}, dtype: float32}}
"""


def test_gradients_match_direct_backward(tiny_models, write_recipe, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    res = compress(write_recipe(RECIPE.format(model=tiny_models["llama"], m=4)), tmp_path / "r")
    summ = res["stages"][1]["summary"]
    assert summ["samples"] == 4 and summ["loss"] == "causal-lm" and summ["bytes"] > 0
    folder = next((tmp_path / "r" / "stages").glob("fisher-*"))
    store = FisherStore(folder)
    tokens = load_file(
        str(next((tmp_path / "r" / "stages").glob("calibrate-*")) / "tokens.safetensors")
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    name = "model.layers.1.mlp.down_proj"
    grads = store.get(name)
    assert grads.shape == (4, 64 * 128)
    for i in (0, 3):
        model.zero_grad()
        ids = tokens["input_ids"][i : i + 1]
        model(input_ids=ids, labels=ids).loss.backward()
        want = model.get_submodule(name).weight.grad.reshape(-1)
        assert torch.allclose(grads[i], want, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grads[0], grads[1])  # one gradient per sample


def test_masked_lm_inputs_are_seeded():
    ids = torch.arange(100).view(2, 50) + 5
    a, la = mlm_inputs(ids, 3, 384, 0.15, seed=7)
    b, lb = mlm_inputs(ids, 3, 384, 0.15, seed=7)
    assert torch.equal(a, b) and torch.equal(la, lb)
    picked = la != -100
    assert (
        (picked.sum(1) >= 1).all()
        and (a[picked] == 3).all()
        and torch.equal(a[~picked], ids[~picked])
    )
    assert torch.equal(la[picked], ids[picked])
    c, _ = mlm_inputs(ids, None, 384, 0.15, seed=7)  # no mask token: random replacements
    assert torch.equal(c[~picked], ids[~picked])


def test_too_few_windows_is_a_field_error(tiny_models, write_recipe, tmp_path):
    res = cli(
        "compress",
        str(write_recipe(RECIPE.format(model=tiny_models["llama"], m=9))),
        "-o",
        str(tmp_path / "r"),
    )
    assert res.exit_code == 1 and "fisher.samples" in res.stderr
