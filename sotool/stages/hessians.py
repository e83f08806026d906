"""`hessians`: the raw Σxxᵀ and token count of every block layer's input, saved once.

Layers that read the same input tensor (q/k/v, gate/up) share one matrix. Every
consumer (gptq, prune, search, rtn's report) reads these files through HessianStore.

Recipe::

    - calibrate: {}
    - hessians: {}
    - gptq: {bits: 4, group_size: 64, hessians: cache}
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sotool.algos.hessian import HessianSum
from sotool.memory import mapped_large_buffers, release
from sotool.models.blocks import BlockRunner, find_blocks, iterate_blocks
from sotool.recipe import Strict
from sotool.registry import register_stage
from sotool.rundir import read_json, write_json


class SharedInputAccumulator:
    """Hook target: accumulates Σxxᵀ per distinct input tensor of the hooked layers.

    Layers called with the very same input tensor object in one forward share an
    accumulator (keyed by the first such layer's name).
    """

    def __init__(self) -> None:
        self.sums: dict[str, HessianSum] = {}
        self.alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor, str] | None = None

    def __call__(self, name: str, _mod: torch.nn.Module, x: torch.Tensor) -> None:
        if self._last is not None and x is self._last[0]:
            key = self._last[1]  # same input as the previous hooked layer: shared
        else:
            key = name
            acc = self.sums.get(key)
            if acc is None:
                acc = self.sums[key] = HessianSum(x.shape[-1], device=x.device)
            acc.add(x)
            self._last = (x, key)
        self.alias[name] = key

    def reset_batch(self) -> None:
        self._last = None

    def get(self, name: str) -> HessianSum:
        return self.sums[self.alias[name]]


def collect(
    runner: BlockRunner, names: list[str], keep_outputs: bool = False, early_stop: bool = False
) -> SharedInputAccumulator:
    """Run the block once over all batches accumulating the Hessians of `names`."""
    acc = SharedInputAccumulator()

    def hook(name: str, mod: torch.nn.Module, x: torch.Tensor) -> None:
        acc(name, mod, x)

    hooks = dict.fromkeys(names, hook)
    runner.forward(
        hooks,
        stop_after=set(names) if early_stop and not keep_outputs else None,
        keep_outputs=keep_outputs,
        on_batch=acc.reset_batch,
    )
    acc.reset_batch()
    return acc


GroupSolver = Callable[[BlockRunner, list[str], SharedInputAccumulator], None]


@mapped_large_buffers()
def sequential_groups(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int,
    wanted: Callable[[str], bool],
    solve: GroupSolver,
    true_sequential: bool = True,
    on_block: Callable[[int, int], None] | None = None,
) -> None:
    """Hessians re-collected on the model as `solve` changes it, block by block.

    For each group of `wanted` layers sharing one input, in execution order (q/k/v, o,
    gate/up, down with `true_sequential`; the whole block otherwise), calls
    `solve(runner, group, accumulator)` once the group's Σxxᵀ is complete; the weights it
    sets feed the next group's inputs and the next block's. With `true_sequential` each
    block costs one forward pass (BlockRunner.forward_in_stages); without it, one pass
    for the Hessians and one for the outputs. Large buffers are mapped directly while
    it runs (see `mapped_large_buffers`).
    """
    relative: list[list[str]] | None = None  # block 0's groups without the block prefix
    for runner in iterate_blocks(
        model, tokens, device=device, batch_size=batch_size, on_block=on_block
    ):
        names = [n for n in runner.layers if wanted(n)]
        if not true_sequential:
            if names:
                solve(runner, names, collect(runner, names, early_stop=True))
            continue
        if relative is None:  # every block has block 0's structure
            cut = len(runner.prefix) + 1
            relative = [[n[cut:] for n in g] for g in runner.input_groups()]
        full = [[f"{runner.prefix}.{n}" for n in g] for g in relative]
        groups = [g for g in ([n for n in g if n in names] for g in full) if g]
        accs = [SharedInputAccumulator() for _ in groups]

        def arrive(k: int, x: torch.Tensor, groups=groups, accs=accs, runner=runner) -> None:
            accs[k].reset_batch()
            for n in groups[k]:
                accs[k](n, runner.layers[n], x)

        def stage(k: int, groups=groups, accs=accs, runner=runner) -> None:
            solve(runner, groups[k], accs[k])
            accs[k] = SharedInputAccumulator()  # frees the Hessian
            release(collect=False)

        runner.forward_in_stages(groups, arrive, stage)


class HessianStore:
    """Read access to a `hessians` stage folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.index: dict[str, dict[str, Any]] = read_json(self.folder / "index.json")

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str) -> tuple[torch.Tensor, int]:
        """(Σxxᵀ (d × d) float32, token count) of layer `name`."""
        e = self.index[name]
        with safe_open(str(self.folder / e["file"]), framework="pt") as f:
            return f.get_tensor(e["key"]), int(e["count"])

    def input_key(self, name: str) -> str:
        return f"{self.index[name]['file']}:{self.index[name]['key']}"


class HessiansParams(Strict):
    """Accumulate layer Hessians on the model as the previous stages left it."""


@register_stage(
    "hessians",
    HessiansParams,
    help="collect Σxxᵀ of every block layer's inputs (one calibration pass)",
)
def run(ctx: Any, params: HessiansParams) -> dict[str, Any]:
    model = ctx.model()
    tokens = ctx.calibration_tokens()
    index: dict[str, dict[str, Any]] = {}
    bs = ctx.recipe.calibration.batch_size
    nblocks = len(find_blocks(model)[1])
    with ctx.progress("hessians: blocks", nblocks) as bar:
        for runner in iterate_blocks(model, tokens, device=ctx.device, batch_size=bs):
            acc = collect(runner, list(runner.layers), keep_outputs=True)
            fname = f"block_{runner.index:03d}.safetensors"
            save_file({k: v.sum.cpu() for k, v in acc.sums.items()}, str(ctx.out_dir / fname))
            for name in runner.layers:
                key = acc.alias[name]
                index[name] = {
                    "file": fname,
                    "key": key,
                    "count": acc.sums[key].count,
                    "dim": acc.sums[key].sum.shape[0],
                }
            bar.advance()
    write_json(ctx.out_dir / "index.json", index)
    return {
        "layers": len(index),
        "tokens": int(tokens.numel()),
        "matrices": len({(v["file"], v["key"]) for v in index.values()}),
    }
