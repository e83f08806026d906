"""Perplexity (decoders) and fidelity to the original model (encoders)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """exp(mean next-token NLL) over non-overlapping windows (N, T): every window is scored
    on its T − 1 predicted tokens, all tokens weigh the same.

    Returns:
        {"ppl", "nll" (mean, nats), "tokens" (count scored), "windows"}.
    """
    model.to(device)
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = _logits(model, ids)
        for j in range(ids.shape[0]):  # one window at a time: log-softmax of one (T × V)
            nll = F.cross_entropy(logits[j, :-1].float(), ids[j, 1:], reduction="sum")
            total += float(nll)
        del logits
        count += ids[:, 1:].numel()
        if on_batch:
            on_batch(ids.shape[0])
    mean = total / max(count, 1)
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": int(windows.shape[0])}


@torch.no_grad()
def hidden_states(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device | str
) -> list[torch.Tensor]:
    """Last hidden states (per batch) of an encoder."""
    model.to(device)
    outs = []
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(device)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        outs.append(out.hidden_states[-1].float().cpu())
    return outs


def fidelity(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    """Mean cosine similarity of per-token hidden states, and relative L2 error."""
    cos, num, den, n = 0.0, 0.0, 0.0, 0
    for a, b in zip(reference, other, strict=True):
        cos += float(F.cosine_similarity(a, b, dim=-1).sum())
        n += a.shape[0] * a.shape[1]
        num += float((a - b).pow(2).sum())
        den += float(a.pow(2).sum())
    return {"cosine": cos / max(n, 1), "rel_l2": math.sqrt(num / max(den, 1e-30))}
