"""The block loop: the one-pass staged forward equals the multi-pass procedure."""

from __future__ import annotations

import pytest
import torch

from sotool.models.blocks import capture_inputs, find_blocks, iterate_blocks
from sotool.models.loading import load_model, resolve_model
from sotool.stages.hessians import collect


def _edit(layers: dict[str, torch.nn.Module], names: list[str]) -> None:
    """A deterministic weight change standing in for quantization: round to a 1/8 grid."""
    with torch.no_grad():
        for n in names:
            w = layers[n].weight
            w.copy_(torch.round(w * 8) / 8)


def _tokens(n: int = 6, t: int = 16) -> torch.Tensor:
    return torch.randint(3, 384, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "bert"])
def test_staged_forward_equals_multi_pass(tiny_models, arch):
    """Pausing every batch before each group until it is edited gives the same group
    inputs and block outputs as re-running the block once per group."""
    tokens = _tokens()
    got: dict[str, list] = {}
    for mode in ("staged", "passes"):
        model = load_model(resolve_model(str(tiny_models[arch])), "float32")
        sums, outs = [], []
        for runner in iterate_blocks(model, tokens, device=torch.device("cpu"), batch_size=2):
            groups = runner.input_groups()
            assert len(groups) >= 3  # qkv-ish, out proj, mlp in, mlp out
            if mode == "staged":
                acc = [torch.zeros(()) for _ in groups]
                seen = [0] * len(groups)

                def arrive(k, x, acc=acc, seen=seen):
                    acc[k] = acc[k] + (x.double() ** 2).sum()
                    seen[k] += 1

                def stage(k, groups=groups, runner=runner, seen=seen):
                    assert seen[k] == 3  # every batch arrived before the group changes
                    _edit(runner.layers, groups[k])

                runner.forward_in_stages(groups, arrive, stage)
                sums.append(acc)
            else:
                acc = []
                for g in groups:
                    a = collect(runner, g, early_stop=True)
                    x = a.get(g[0])
                    acc.append(x.sum.double().diagonal().sum())
                    _edit(runner.layers, g)
                sums.append(acc)
            outs.append([h.clone() for h in runner.outputs()])
        got[mode] = [sums, outs]
    (s1, o1), (s2, o2) = got["staged"], got["passes"]
    for a, b in zip(s1, s2, strict=True):
        assert torch.allclose(torch.stack(a).double(), torch.stack(b).double(), rtol=1e-5)
    for a, b in zip(o1, o2, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    # the edits took effect: outputs differ from the unedited model's
    model = load_model(resolve_model(str(tiny_models[arch])), "float32")
    ref = capture_inputs(model, tokens, 2, torch.device("cpu"))
    block = find_blocks(model)[1][0]
    with torch.no_grad():
        y = block(ref.hidden[0], *ref.args[0], **ref.kwargs[0])
    y = y[0] if isinstance(y, tuple) else y
    assert not torch.allclose(y, o1[0][0])


def test_staged_forward_error_in_stage_propagates(tiny_models):
    model = load_model(resolve_model(str(tiny_models["llama"])), "float32")
    runner = next(iterate_blocks(model, _tokens(), device=torch.device("cpu"), batch_size=2))
    groups = runner.input_groups()

    def stage(k):
        if k == 1:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        runner.forward_in_stages(groups, lambda k, x: None, stage)
