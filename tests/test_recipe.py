"""Recipe validation: every error path gives one line naming the file, field and fix."""

import pytest

from sotool.errors import SotoolError
from sotool.recipe import apply_overrides, load_recipe
from sotool.registry import get_stage, known_stages

GOOD = """
model: {model}
seed: 0
calibration: {{source: pydoc, samples: 4, seqlen: 32}}
stages:
  - calibrate: {{}}
  - rtn: {{bits: 4, group_size: 32}}
  - evaluate: {{windows: 2, seqlen: 32}}
"""


def recipe_text(model="some/dir", **subs):
    return GOOD.format(model=model)


def err_of(path, overrides=()):
    with pytest.raises(SotoolError) as e:
        load_recipe(path, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_good_recipe_defaults_filled(write_recipe):
    r = load_recipe(write_recipe(recipe_text()))
    resolved = r.resolved()
    assert resolved["stages"][1]["rtn"]["sym"] is True
    assert resolved["calibration"]["samples"] == 4
    assert [e.name for e in r.stages] == ["calibrate", "rtn", "evaluate"]


def test_typo_in_stage_name(write_recipe):
    p = write_recipe(recipe_text().replace("- rtn:", "- rnt:"))
    msg = err_of(p)
    assert "stages[1]" in msg and "'rnt'" in msg and "did you mean 'rtn'" in msg
    assert str(p) in msg


def test_wrong_type(write_recipe):
    p = write_recipe(recipe_text().replace("bits: 4", "bits: four"))
    msg = err_of(p)
    assert "stages[1].rtn.bits" in msg and "'four'" in msg


def test_bad_bits_value(write_recipe):
    msg = err_of(write_recipe(recipe_text().replace("bits: 4", "bits: 5")))
    assert "rtn.bits" in msg and "5" in msg


def test_unknown_field(write_recipe):
    msg = err_of(write_recipe(recipe_text().replace("group_size: 32", "groupsize: 32")))
    assert "rtn.groupsize: unknown field" in msg and "spelling" in msg


def test_unknown_top_level_field(write_recipe):
    msg = err_of(write_recipe(recipe_text() + "extra_thing: 1\n"))
    assert "extra_thing: unknown field" in msg


def test_missing_model(write_recipe):
    msg = err_of(write_recipe(recipe_text().replace("model: some/dir\n", "")))
    assert "model: Field required" in msg and "add it" in msg


def test_yaml_syntax_error(write_recipe):
    msg = err_of(write_recipe("model: x\nstages: [\n  - a: {"))
    assert "YAML syntax error" in msg


def test_missing_file(tmp_path):
    msg = err_of(tmp_path / "nope.yaml")
    assert "not found" in msg


def test_not_a_mapping(write_recipe):
    assert "YAML mapping" in err_of(write_recipe("- just\n- a list\n"))


def test_bad_group_size(write_recipe):
    msg = err_of(write_recipe(recipe_text().replace("group_size: 32", "group_size: 0")))
    assert "group_size" in msg and "per channel" in msg


def test_set_overrides_with_types(write_recipe):
    p = write_recipe(recipe_text())
    r = load_recipe(p, ["rtn.bits=3", "calibration.samples=8", "rtn.sym=false", "seed=5"])
    assert r.stages[1].params.bits == 3 and r.stages[1].params.sym is False
    assert r.recipe.calibration.samples == 8 and r.recipe.seed == 5
    r = load_recipe(p, ["stages.1.group_size=-1"])
    assert r.stages[1].params.group_size == -1


def test_set_errors(write_recipe):
    p = write_recipe(recipe_text())
    assert "rtn.bits" in err_of(p, ["rtn.bits=seven"])
    assert "no stage or field 'gptq'" in err_of(p, ["gptq.bits=3"])
    assert "KEY=VALUE" in err_of(p, ["rtn.bits"])
    assert "unknown field" in err_of(p, ["rtn.bitz=3"])


def test_set_ambiguous_stage(write_recipe):
    text = recipe_text() + "  - rtn: {bits: 8}\n"
    p = write_recipe(text)
    assert "rtn#0" in err_of(p, ["rtn.bits=3"])
    r = load_recipe(p, ["rtn#1.bits=3"])
    assert r.stages[1].params.bits == 4 and r.stages[3].params.bits == 3


def test_overrides_do_not_mutate_input():
    data = {"model": "m", "stages": [{"rtn": {"bits": 4}}]}
    apply_overrides(data, ["rtn.bits=2"])
    assert data["stages"][0]["rtn"]["bits"] == 4


def test_registry_lists_known_on_unknown():
    with pytest.raises(SotoolError) as e:
        get_stage("quantize")
    for name in ("calibrate", "rtn", "gptq", "hessians", "evaluate", "export"):
        assert name in str(e.value)
    assert set(known_stages()) >= {"calibrate", "rtn", "gptq", "hessians", "evaluate", "export"}


def test_register_twice_rejected():
    from sotool.recipe import Strict
    from sotool.registry import register_stage

    with pytest.raises(ValueError):
        register_stage("rtn", Strict, help="dup")(lambda ctx, p: {})


def test_bad_regex_in_prune_params(write_recipe):
    text = recipe_text().replace(
        "- rtn: {bits: 4, group_size: 32}", "- prune: {ignore: ['lm_head(']}"
    )
    msg = err_of(write_recipe(text))
    assert "stages[1].prune.ignore" in msg and "invalid regex" in msg
