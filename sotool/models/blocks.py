"""Block discovery and the one block-by-block calibration loop every stage shares.

The loop captures the inputs of the first transformer block, then runs one block at a
time over all calibration batches, so only one block's activations are alive. Stages
hook the block's Linear (and GPT-2 Conv1D) layers through `BlockRunner.forward`.
Adding an architecture means adding its block path to `BLOCK_PATHS` (most are found
by the generic search anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import greenlet
import torch
from torch import nn

from sotool.errors import SotoolError
from sotool.memory import page_out, release

# Where the ModuleList of transformer blocks lives, per architecture family.
BLOCK_PATHS = [
    "model.layers",  # Llama, Mistral, Qwen, Gemma
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # Pythia
    "bert.encoder.layer",  # BERT
    "roberta.encoder.layer",  # RoBERTa
    "encoder.layer",  # bare BertModel
    "distilbert.transformer.layer",  # DistilBERT
    "model.language_model.layers",  # multimodal wrappers
]

LayerHook = Callable[[str, nn.Module, torch.Tensor], None]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The (dotted path, ModuleList) of the model's transformer blocks."""
    for path in BLOCK_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise SotoolError(
            f"cannot find the transformer blocks of {type(model).__name__}; "
            "add its block path to BLOCK_PATHS in sotool/models/blocks.py"
        )
    return best


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), whose weight is stored transposed."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as [out, in] (a transposed view for Conv1D)."""
    w = module.weight
    return w.t() if type(module).__name__ == "Conv1D" else w


def linear_layers(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Full dotted name -> Linear/Conv1D module, in definition order."""
    return {
        f"{prefix}.{name}": mod for name, mod in block.named_modules() if name and is_linear(mod)
    }


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors inside nested tuples/lists/dicts to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class _Captured(Exception):
    pass


class StopForward(Exception):
    """Raised inside a hook to end a block's forward early (the rest is not needed)."""


@dataclass
class BlockInputs:
    """What the current block receives: hidden states and call arguments per batch."""

    hidden: list[torch.Tensor]  # each (B, T, D)
    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]


def _move_outside_blocks(model: nn.Module, blocks_path: str, device: torch.device) -> None:
    """Move every parameter and buffer not inside the blocks to `device`."""
    for name, mod in model.named_modules():
        if name == blocks_path or name.startswith(blocks_path + "."):
            continue
        for p in mod.parameters(recurse=False):
            if p.device != device:
                p.data = p.data.to(device)
        for bname, b in list(mod.named_buffers(recurse=False)):
            if b is not None and b.device != device:
                mod._buffers[bname] = b.to(device)


def capture_inputs(
    model: nn.Module, tokens: torch.Tensor, batch_size: int, device: torch.device
) -> BlockInputs:
    """Run the model up to its first block for every batch of `tokens` (N, T)."""
    path, blocks = find_blocks(model)
    _move_outside_blocks(model, path, device)
    first = blocks[0]
    first.to(device)
    got = BlockInputs([], [], [])

    def grab(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs.pop("layer_past", None)
        got.hidden.append(hidden.detach())
        got.args.append(rest)
        got.kwargs.append(kwargs)
        raise _Captured

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, tokens.shape[0], batch_size):
                ids = tokens[i : i + batch_size].to(device)
                try:
                    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return got


class BlockRunner:
    """One block during the loop: run it over every batch, with hooks, as often as needed."""

    def __init__(self, index: int, prefix: str, block: nn.Module, inputs: BlockInputs) -> None:
        self.index = index
        self.prefix = prefix
        self.block = block
        self.inputs = inputs
        self.layers = linear_layers(block, prefix)
        self.next_hidden: list[torch.Tensor] | None = None

    def _call(self, b: int) -> torch.Tensor:
        out = self.block(self.inputs.hidden[b], *self.inputs.args[b], **self.inputs.kwargs[b])
        return out[0] if isinstance(out, tuple) else out

    def forward(
        self,
        hooks: dict[str, LayerHook] | None = None,
        stop_after: set[str] | None = None,
        keep_outputs: bool = False,
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        """Run the block over all batches, calling `hooks[name](name, module, x)` with each
        hooked layer's input x (B, T, in). With `stop_after`, each batch stops once those
        layers have run. With `keep_outputs`, the outputs become the next block's inputs
        (only valid when the block's weights are final).
        """
        hooks = hooks or {}
        seen: set[str] = set()
        handles = []

        def make(name: str, fn: LayerHook) -> Callable[..., None]:
            def hook(mod: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
                fn(name, mod, args[0])
                if stop_after is not None:
                    seen.add(name)
                    if stop_after <= seen:
                        raise StopForward

            return hook

        for name, fn in hooks.items():
            handles.append(self.layers[name].register_forward_hook(make(name, fn)))
        outs: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for b in range(len(self.inputs.hidden)):
                    seen.clear()
                    if on_batch is not None:
                        on_batch()
                    try:
                        y = self._call(b)
                        if keep_outputs:
                            outs.append(y.detach())
                    except StopForward:
                        if keep_outputs:
                            raise RuntimeError("keep_outputs needs a full forward") from None
        finally:
            for h in handles:
                h.remove()
        if keep_outputs:
            self.next_hidden = outs

    def forward_in_stages(
        self,
        groups: list[list[str]],
        on_arrive: Callable[[int, torch.Tensor], None],
        on_stage: Callable[[int], None],
    ) -> None:
        """One pass over all batches that pauses before each group of layers.

        Every batch runs until it reaches group k (layers sharing one input, in execution
        order), `on_arrive(k, x)` sees that input x (B, T, in), and once every batch has
        arrived `on_stage(k)` runs once (e.g. quantizes the group); then all batches
        resume with the group's new weights. The outputs, computed with every group's
        final weights, become the next block's inputs. This is the true-sequential
        procedure for the cost of a single forward pass. Each batch's forward is a
        greenlet paused inside a layer pre-hook: one OS thread, batches take turns in
        order (so every sum is deterministic), and only the paused activations stay alive.
        """
        nb = len(self.inputs.hidden)
        group_of = {id(self.layers[n]): k for k, g in enumerate(groups) for n in g}
        done = [False] * len(groups)
        outs: list[torch.Tensor | None] = [None] * nb
        main = greenlet.getcurrent()

        def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            k = group_of[id(mod)]
            if not done[k]:
                on_arrive(k, args[0])
                main.switch()  # paused until every batch has arrived and the group is done

        def call(b: int) -> torch.Tensor:
            return self._call(b).detach()

        lets = [greenlet.greenlet(lambda b=b: call(b)) for b in range(nb)]

        def resume(b: int) -> None:  # run batch b to its next pause or to its end
            result = lets[b].switch()
            if lets[b].dead:
                outs[b] = result

        handles = [self.layers[n].register_forward_pre_hook(pre_hook) for g in groups for n in g]
        try:
            with torch.no_grad():
                for k in range(len(groups)):
                    for b in range(nb):
                        if not lets[b].dead:
                            resume(b)
                    on_stage(k)
                    done[k] = True
                for b in range(nb):
                    if not lets[b].dead:
                        resume(b)
        finally:
            for h in handles:
                h.remove()
            lets.clear()  # paused batches (after an error) are unwound by GreenletExit
        missing = [b for b in range(nb) if outs[b] is None]
        if missing:
            raise RuntimeError(f"block {self.index}: batches {missing} produced no output")
        self.next_hidden = [o for o in outs if o is not None]

    def input_groups(self) -> list[list[str]]:
        """Layers grouped by shared input, in execution order (e.g. [[q,k,v],[o],[gate,up],
        [down]] for Llama), traced on the first batch. Used for true-sequential order."""
        order: list[tuple[str, torch.Tensor]] = []
        handles = [
            mod.register_forward_hook(
                lambda m, a, o, n=name: order.append((n, a[0])),
            )
            for name, mod in self.layers.items()
        ]
        try:
            with torch.no_grad():
                self._call(0)
        finally:
            for h in handles:
                h.remove()
        groups: list[list[str]] = []
        last: torch.Tensor | None = None
        for name, x in order:
            if any(name in g for g in groups):
                continue
            if last is not None and x is last:
                groups[-1].append(name)
            else:
                groups.append([name])
            last = x
        return groups

    def outputs(self) -> list[torch.Tensor]:
        """The block's outputs with its current weights (computed once)."""
        if self.next_hidden is None:
            self.forward(keep_outputs=True)
        assert self.next_hidden is not None
        return self.next_hidden


def iterate_blocks(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 8,
    on_block: Callable[[int, int], None] | None = None,
) -> Iterator[BlockRunner]:
    """Yield a BlockRunner per block; after the caller is done with one, its outputs
    (with the block's weights as the caller left them) feed the next block.

    Args:
        model: the full model (on the CPU; each block visits `device` in turn).
        tokens: (N, T) int64 calibration token windows.
        device: where blocks and activations live during the loop.
        batch_size: windows per block call.
        on_block: progress callback (done, total).
    """
    path, blocks = find_blocks(model)
    inputs = capture_inputs(model, tokens, batch_size, device)
    n = len(blocks)
    for i, block in enumerate(blocks):
        block.to(device)
        runner = BlockRunner(i, f"{path}.{i}", block, inputs)
        yield runner
        if i + 1 < n:
            inputs = BlockInputs(runner.outputs(), inputs.args, inputs.kwargs)
        runner.next_hidden = None
        del runner
        release()
        if device.type != "cpu":
            block.to("cpu")
        else:  # done with: its weights need not stay in memory (see page_out)
            page_out(block.parameters())
        if on_block:
            on_block(i + 1, n)
    if device.type != "cpu":
        _move_outside_blocks(model, path, torch.device("cpu"))
