import json

import pytest
import torch

from sotool.calib import sources
from sotool.errors import SotoolError


def test_jsonl_field_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "alpha"}) + "\n\n" + json.dumps({"text": "beta"}) + "\n")
    assert sources.read_text(str(p), "text", "w") == "alpha\n\nbeta"
    with pytest.raises(SotoolError, match=r"d.jsonl:1: no field 'body'"):
        sources.read_text(str(p), "body", "w")
    p.write_text("{not json}\n")
    with pytest.raises(SotoolError, match="invalid JSON"):
        sources.read_text(str(p), "text", "w")


def test_missing_and_directory_sources(tmp_path):
    with pytest.raises(SotoolError, match="not found"):
        sources.check_source(str(tmp_path / "nope.txt"), "calibration.source")
    with pytest.raises(SotoolError, match="is a directory"):
        sources.check_source(str(tmp_path), "calibration.source")
    sources.check_source("pydoc", "x")  # built-ins need no file


def test_random_windows_seeded_and_in_span():
    stream = torch.arange(1000)
    a = sources.random_windows(stream, 5, 20, seed=3, what="w")
    b = sources.random_windows(stream, 5, 20, seed=3, what="w")
    assert torch.equal(a, b) and a.shape == (5, 20)
    assert (a[:, 1:] - a[:, :-1] == 1).all()  # contiguous slices of the stream
    part = sources.span_of(stream, (0.5, 1.0))
    assert int(part.min()) == 500
    with pytest.raises(SotoolError, match="need at least seqlen=2000"):
        sources.random_windows(stream, 1, 2000, seed=0, what="w")


def test_consecutive_windows_from_end():
    stream = torch.arange(105)
    w = sources.consecutive_windows(stream, 3, 10, "w", from_end=True)
    assert w[-1, -1] == 104 and w[0, 0] == 75
    assert sources.consecutive_windows(stream, 50, 10, "w").shape == (10, 10)


def test_random_tokens_avoid_special_ids():
    t = sources.random_tokens(4, 64, vocab=10, seed=0, exclude={0, 1, 2})
    assert t.shape == (4, 64) and int(t.min()) >= 3 and int(t.max()) <= 9


def test_pydoc_text_is_real_prose():
    text = sources.pydoc_text()
    assert len(text) > 100_000 and "the" in text


def test_source_fingerprint_tracks_content(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one")
    a = sources.source_fingerprint(str(p))
    p.write_text("two")
    assert sources.source_fingerprint(str(p)) != a


@pytest.mark.parametrize("source", ["random", "generate", "jsonl"])
def test_calibrate_stage_sources(source, tiny_models, write_recipe, tmp_path):
    from sotool.tensorio import load_shards  # noqa: F401  (import check of the package)
    from tests.test_pipeline import compress

    if source == "jsonl":
        data = tmp_path / "c.jsonl"
        data.write_text(
            "\n".join(
                json.dumps({"body": sources.pydoc_text()[i : i + 4000]})
                for i in range(0, 40000, 4000)
            )
        )
        spec = f"{{source: {data}, field: body, samples: 3, seqlen: 16}}"
    else:
        spec = f"{{source: {source}, samples: 3, seqlen: 16}}"
    recipe = write_recipe(
        f"model: {tiny_models['llama']}\ncalibration: {spec}\nstages:\n  - calibrate: {{}}\n"
    )
    res = compress(recipe, tmp_path / "run")
    assert res["stages"][0]["summary"]["samples"] == 3
    from safetensors.torch import load_file

    tokens = load_file(
        str(next((tmp_path / "run" / "stages").glob("calibrate-*")) / "tokens.safetensors")
    )["input_ids"]
    assert tokens.shape == (3, 16) and tokens.dtype == torch.int64
    assert int(tokens.max()) < 384
