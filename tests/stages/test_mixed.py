"""sensitivity → search → gptq → evaluate on the tiny Llama: the searched bits are used."""

from __future__ import annotations

import json

import pytest

from sotool.algos.search import quantized_layer_bytes
from sotool.rundir import read_json
from sotool.tensorio import load_shards
from tests.test_pipeline import RECIPE as PIPELINE
from tests.test_pipeline import cli, compress

# the pipeline tests' model, calibration, calibrate and hessians stages, then ours
RECIPE = (
    PIPELINE[: PIPELINE.index("  - gptq")]
    + """  - sensitivity:
      metrics: [layerwise, trace, eigen, fisher]
      bits: [2, 4]
      group_sizes: [32]
      samples: 2
      seqlen: 32
      trace_iters: 20
      eigen_iters: 5
      eigen_layers: ['layers\\.0\\.']
  - search: {{metric: {metric}, budget: {budget}}}
  - gptq: {{hessians: cache}}
  - evaluate: {{data: pydoc, span: [0.5, 1.0], windows: 2, seqlen: 32}}
"""
)


def _stage(run, name):
    return next((run / "stages").glob(f"{name}-*"))


def test_mixed_pipeline_uses_searched_bits(tiny_models, write_recipe, tmp_path):
    recipe = write_recipe(
        RECIPE.format(model=tiny_models["llama"], metric="layerwise", budget="{avg_bits: 3.0}")
    )
    res = compress(recipe, tmp_path / "run")
    names = [s["name"] for s in res["stages"]]
    assert names == ["calibrate", "hessians", "sensitivity", "search", "gptq", "evaluate"]
    sens = read_json(_stage(tmp_path / "run", "sensitivity") / "sensitivity.json")
    layers = sens["layers"]
    assert len(layers) == 14  # 2 blocks × (q, k, v, o, gate, up, down)
    for n, e in layers.items():
        assert e["trace"] is not None and e["fisher"] > 0
        assert (e["eigen"] is not None) == (".layers.0." in n)  # eigen only where asked
        # a coarser grid costs more under the layer-wise objective
        assert e["cost"]["layerwise"]["w2g32"] > e["cost"]["layerwise"]["w4g32"] > 0
    alloc = read_json(_stage(tmp_path / "run", "search") / "allocation.json")
    chosen = alloc["layers"]
    assert {c["bits"] for c in chosen.values()} == {2, 4}  # a real mix at 3 bits average
    n_all = sum(e["params"] for e in layers.values())
    assert sum(c["bits"] * layers[n]["params"] for n, c in chosen.items()) <= 3.0 * n_all
    # gptq quantized each layer with its searched grid
    q = load_shards(_stage(tmp_path / "run", "gptq"), "quant")
    meta = read_json(_stage(tmp_path / "run", "gptq") / "quant.json")
    for n, c in chosen.items():
        assert meta[n]["bits"] == c["bits"] and meta[n]["group_size"] == c["group_size"]
        assert int(q[f"{n}.codes"].max()) < 2 ** c["bits"]
        rows, cols = layers[n]["shape"]
        assert c["bytes"] == quantized_layer_bytes(rows, cols, c["bits"], c["group_size"])
    gp = res["stages"][4]["summary"]
    assert gp["bits"] == "mixed" and abs(gp["avg_bits"] - alloc["avg_bits"]) < 1e-9
    front = read_json(_stage(tmp_path / "run", "search") / "frontier.json")
    for a, b in zip(front, front[1:], strict=False):
        assert a["size"] < b["size"] and a["cost"] > b["cost"]
    assert res["stages"][5]["summary"]["ppl"] > 1
    # the report shows every metric, the allocation and the frontier, within 100 columns
    png = tmp_path / "mixed.png"
    rep = cli("report", str(tmp_path / "run"), "--sort", "trace", "--plot", str(png))
    assert rep.exit_code == 0, rep.stderr
    text = rep.stdout
    for head in ("tr(H)/n", "λmax", "fisher/n", "gptq obj.", "Pareto frontier", "◀ chosen"):
        assert head in text, head
    assert max(len(line) for line in text.splitlines()) <= 100
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_byte_budget_and_key_change(tiny_models, write_recipe, tmp_path):
    sizes = {"w2g32": 0, "w4g32": 0}
    for rows, cols, k in [(64, 64, 2), (32, 64, 2), (128, 64, 2), (64, 128, 1)]:
        for lab, b in (("w2g32", 2), ("w4g32", 4)):
            sizes[lab] += 2 * k * quantized_layer_bytes(rows, cols, b, 32)
    budget = (sizes["w2g32"] + sizes["w4g32"]) // 2
    recipe = write_recipe(
        RECIPE.format(model=tiny_models["llama"], metric="trace", budget=f"{{bytes: {budget}}}")
    )
    first = compress(recipe, tmp_path / "run")
    alloc = read_json(_stage(tmp_path / "run", "search") / "allocation.json")
    assert sizes["w2g32"] < alloc["total_bytes"] <= budget
    assert alloc["total_bytes"] == sum(c["bytes"] for c in alloc["layers"].values())
    # another metric changes the allocation stage's key and everything after it
    again = compress(recipe, tmp_path / "run", "--set", "search.metric=fisher")
    assert [s["action"] for s in again["stages"]] == ["skipped"] * 3 + ["ran"] * 3
    assert again["stages"][4]["key"] != first["stages"][4]["key"]
    json.dumps(again)


def test_max_degradation_bisects_the_frontier(tiny_models, write_recipe, tmp_path):
    recipe = write_recipe(
        RECIPE.format(model=tiny_models["llama"], metric="layerwise", budget="{avg_bits: 4.0}")
    )
    sets = ["--set", "search.max_degradation=0.02", "--set", "search.max_evals=4"]
    sets += ["--set", "sensitivity.metrics=[layerwise]"]
    compress(recipe, tmp_path / "run", *sets)
    alloc = read_json(_stage(tmp_path / "run", "search") / "allocation.json")
    head, steps = alloc["bisection"][0], alloc["bisection"][1:]
    assert 1 <= len(steps) <= 4 and head["bound"] == pytest.approx(head["base_ppl"] * 1.02)
    sens = read_json(_stage(tmp_path / "run", "sensitivity") / "sensitivity.json")["layers"]
    assert set(alloc["layers"]) == set(sens)
    chosen = sum(alloc["layers"][n]["bits"] * e["params"] for n, e in sens.items())  # code bits
    # bisection invariant: measured passes are at or above the chosen size, failures below
    for s in steps:
        assert (s["ok"] and s["ppl"] <= head["bound"]) or (not s["ok"] and s["ppl"] > head["bound"])
        assert (s["size"] >= chosen) == s["ok"] or not any(x["ok"] for x in steps)
    meta = read_json(_stage(tmp_path / "run", "gptq") / "quant.json")
    assert all(meta[n]["bits"] == c["bits"] for n, c in alloc["layers"].items())


def test_interlayer_block_correction_rescales_costs(tiny_models, write_recipe, tmp_path):
    """interlayer: block measures each block at its cheapest grids; the block's costs
    are rescaled by measured/predicted (mean 1) and the search runs on them."""
    recipe = write_recipe(
        RECIPE.format(model=tiny_models["llama"], metric="layerwise", budget="{avg_bits: 3.0}")
    )
    sets = ["--set", "search.interlayer=block", "--set", "sensitivity.metrics=[layerwise]"]
    compress(recipe, tmp_path / "run", *sets)
    alloc = read_json(_stage(tmp_path / "run", "search") / "allocation.json")
    sens = read_json(_stage(tmp_path / "run", "sensitivity") / "sensitivity.json")["layers"]
    blocks = alloc["interlayer"]
    assert len(blocks) == 2  # the tiny Llama's two blocks
    assert sum(b["scale"] for b in blocks.values()) / len(blocks) == pytest.approx(1.0)
    for b in blocks.values():
        assert b["measured_dnll"] != 0 and b["predicted"] > 0
    for n, c in alloc["layers"].items():
        scale = blocks[n.split("layers.")[1].split(".")[0]]["scale"]
        raw = sens[n]["cost"]["layerwise"][c["label"]]
        assert c["cost"] == pytest.approx(raw * scale)
    for b, e in blocks.items():  # predicted: the block's layers at w2g32, the cheapest grid
        want = sum(v["cost"]["layerwise"]["w2g32"] for n, v in sens.items() if f"layers.{b}." in n)
        assert e["predicted"] == pytest.approx(want, rel=1e-6)
