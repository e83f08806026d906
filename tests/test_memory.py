"""Memory: pages of weights a loop is done with go back to the kernel, and a stage's new
weights live in its files rather than in ordinary memory; no value ever changes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from sotool.errors import SotoolError
from sotool.memory import page_out
from sotool.models.blocks import iterate_blocks
from sotool.pipeline import WeightSpill, apply_weights
from sotool.tensorio import iter_file, shard_files

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="page residency is read from /proc (Linux)"
)


def resident(path: Path) -> int:
    """Bytes of `path`'s mappings resident in this process."""
    total, inside = 0, False
    target = str(Path(path).resolve())
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and ":" not in head[0]:  # a mapping's header line
                inside = len(head) >= 6 and head[-1] == target
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def mapped_from(t: torch.Tensor, path: Path) -> bool:
    """Whether t's data lies in a mapping of `path`."""
    target, ptr = str(Path(path).resolve()), t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            head = line.split()
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            if lo <= ptr < hi:
                return len(head) >= 6 and head[-1] == target
    return False


def test_page_out_drops_clean_pages_and_loses_nothing(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref = {"a": torch.randn(1024, 1024, generator=g), "b": torch.randn(512, 1024, generator=g)}
    path = tmp_path / "w.safetensors"
    save_file(ref, str(path))
    os.sync()
    t = dict(iter_file(path))
    assert torch.equal(t["a"], ref["a"]) and torch.equal(t["b"], ref["b"])  # read in
    before = resident(path)
    assert before >= 5 * 2**20
    page_out([t["a"], t["b"]])
    assert resident(path) < 64 * 1024  # a boundary page or two at most
    assert torch.equal(t["a"], ref["a"]) and torch.equal(t["b"], ref["b"])  # faulted back
    # written pages are private copies: paging out keeps them, values and all
    t["a"].mul_(2)
    page_out([t["a"]])
    assert torch.equal(t["a"], ref["a"] * 2)
    assert torch.equal(load_file(str(path))["a"], ref["a"])  # the file never changes
    heap = torch.randn(256, 1024, generator=g)
    copy = heap.clone()
    page_out([heap, heap[:, :7], torch.empty(0)])
    assert torch.equal(heap, copy)


def _saved_model(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    os.sync()  # clean page cache: the kernel drops only pages already on disk
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    return model, tmp_path / "m" / "model.safetensors"


def test_block_loop_hands_back_each_finished_block(tmp_path):
    """After the loop no block's weights stay resident; without page_out all of them
    would (every block's weights were read)."""
    model, file = _saved_model(tmp_path)
    assert all(mapped_from(p, file) for p in model.model.layers.parameters())
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    most = 0
    for runner in iterate_blocks(model, tokens, device=torch.device("cpu"), batch_size=2):
        runner.outputs()
        most = max(most, resident(file))
    assert most >= block_bytes  # a block's weights were in memory while it ran
    assert resident(file) < block_bytes / 4
    with torch.no_grad():  # and the model is intact
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
        for (n, p), q in zip(model.named_parameters(), again.parameters(), strict=True):
            assert torch.equal(p, q), n


def test_weight_spill_maps_new_weights_from_the_stage_files(tmp_path):
    model, file = _saved_model(tmp_path)
    out = tmp_path / "stage"
    out.mkdir()
    spill = WeightSpill(model, out, shard_bytes=2**20)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    new = {n: torch.full((1024, 256), float(i)) for i, n in enumerate(names)}  # 1 MiB each
    params = dict(model.named_parameters())
    spill.add({names[0]: new[names[0]]})  # a full shard: written and mapped back
    shards = shard_files(out, "weights")
    assert len(shards) == 1 and mapped_from(params[names[0]], shards[0])
    with pytest.raises(SotoolError, match="shape"):
        apply_weights(model, {names[1]: new[names[1]][:, :128]})
    with pytest.raises(SotoolError, match="does not exist"):
        spill.add({"model.layers.9.mlp.up_proj.weight": new[names[1]]})
    with pytest.raises(ValueError, match="twice"):
        spill.add({names[0]: new[names[0]]})
    spill.writer.shard_bytes = 4 * 2**20
    spill.add({names[1]: new[names[1]]})  # pending: an ordinary copy, not the caller's
    assert not mapped_from(params[names[1]], shards[0])
    assert params[names[1]].data_ptr() != new[names[1]].data_ptr()
    spill.add({names[2]: new[names[2]]})
    spill.close()
    shards = shard_files(out, "weights")
    assert len(shards) == 2
    for n in names:
        assert any(mapped_from(params[n], s) for s in shards), n
        assert torch.equal(params[n], new[n])
    saved = {k: v for s in shards for k, v in load_file(str(s)).items()}
    assert sorted(saved) == sorted(names)
    assert all(torch.equal(saved[n], new[n]) for n in names)
    # the weights they replaced were handed back; the rest of the model is untouched
    assert not any(mapped_from(params[n], file) for n in names)
    assert mapped_from(params["model.layers.0.mlp.down_proj.weight"], file)
