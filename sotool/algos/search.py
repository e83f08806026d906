"""Mixed-precision allocation: exact sizes and an exact multiple-choice knapsack.

Each layer i picks one choice c from its candidates, with an integer size wᵢ(c) and a
predicted cost Ωᵢ(c). `allocate` minimises ΣΩ subject to Σw ≤ budget exactly: a
dynamic program over the summed size, with every size expressed relative to the
layer's smallest choice and divided by the gcd of all those differences, so the table
is small while the arithmetic stays exact (no rounding of sizes). The same table gives
the whole Pareto frontier (best predicted cost at each reachable size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sotool.algos.pack import packed_len

MAX_CELLS = 200_000_000  # layers × reduced capacity: the DP's back-pointer table


def quantized_layer_bytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Exact bytes of one layer in the GPTQ checkpoint layout.

    qweight int32 [ceil(cols·b/32), rows] + scales fp16 [groups, rows] + qzeros int32
    [groups, ceil(rows·b/32)] + g_idx int32 [cols]. The bias (unchanged) is not counted.

    Args:
        rows: output features.
        cols: input features.
        bits: bits per code.
        group_size: columns per group; −1 (or 0) = per channel (one group).
    """
    groups = 1 if group_size <= 0 else math.ceil(cols / group_size)
    return (
        4 * packed_len(cols, bits) * rows
        + 2 * groups * rows
        + 4 * groups * packed_len(rows, bits)
        + 4 * cols
    )


@dataclass
class Allocation:
    """The result of `allocate`.

    Attributes:
        choice: (L,) index of the chosen candidate per layer.
        cost: Σ predicted cost.
        size: Σ size (same unit as the input sizes).
    """

    choice: list[int]
    cost: float
    size: int


@dataclass
class _Table:
    base: int  # Σ smallest size per layer
    unit: int  # gcd of the size differences
    best: np.ndarray  # (cap+1,) best cost using exactly `base + s·unit`
    back: np.ndarray  # (L, cap+1) int16 choice of layer l at each reduced size
    steps: list[np.ndarray]  # per layer: reduced size difference of each choice


def _check(costs: list[list[float]], sizes: list[list[int]]) -> None:
    if len(costs) != len(sizes) or not costs:
        raise ValueError("costs and sizes need one non-empty list per layer")
    for i, (c, s) in enumerate(zip(costs, sizes, strict=True)):
        if len(c) != len(s) or not c:
            raise ValueError(f"layer {i}: costs and sizes need the same non-zero length")
        if any(int(x) != x or x < 0 for x in s):
            raise ValueError(f"layer {i}: sizes must be non-negative integers")


def _table(costs: list[list[float]], sizes: list[list[int]]) -> _Table:
    _check(costs, sizes)
    mins = [min(s) for s in sizes]
    diffs = [int(x) - m for s, m in zip(sizes, mins, strict=True) for x in s]
    unit = math.gcd(*diffs) or 1
    steps = [np.array([(int(x) - m) // unit for x in s]) for s, m in zip(sizes, mins, strict=True)]
    cap = int(sum(int(st.max()) for st in steps))
    if len(costs) * (cap + 1) > MAX_CELLS:
        raise ValueError(
            f"search table too large ({len(costs)} layers × {cap + 1} sizes); "
            "use fewer candidates or sizes with a larger common divisor"
        )
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    back = np.zeros((len(costs), cap + 1), dtype=np.int16)
    reach = 0
    for layer, (c, st) in enumerate(zip(costs, steps, strict=True)):
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        hi = reach + int(st.max())
        for j, (cj, sj) in enumerate(zip(c, st, strict=True)):
            cand = best[: reach + 1] + float(cj)
            seg = new[sj : sj + reach + 1]
            better = cand < seg
            seg[better] = cand[better]
            arg[sj : sj + reach + 1][better] = j
        best, reach = new, hi
        back[layer] = arg
    return _Table(sum(int(m) for m in mins), unit, best, back, steps)


def _backtrack(t: _Table, s: int) -> list[int]:
    out = []
    for layer in range(t.back.shape[0] - 1, -1, -1):
        j = int(t.back[layer, s])
        out.append(j)
        s -= int(t.steps[layer][j])
    return out[::-1]


def allocate(costs: list[list[float]], sizes: list[list[int]], budget: int) -> Allocation:
    """The choice per layer minimising Σ cost with Σ size ≤ budget (exact).

    Args:
        costs: L lists, cost of each candidate of the layer.
        sizes: L lists of non-negative integer sizes (bytes, or code bits).
        budget: the largest total size allowed.

    Returns:
        Allocation. Raises ValueError when even the smallest choices exceed the budget.
    """
    t = _table(costs, sizes)
    if budget < t.base:
        raise ValueError(f"budget {budget} is below the smallest possible size {t.base}")
    limit = min((budget - t.base) // t.unit, len(t.best) - 1)
    s = int(np.argmin(t.best[: limit + 1]))  # first index of the minimum: the smallest size
    choice = _backtrack(t, s)
    return Allocation(choice, float(t.best[s]), t.base + s * t.unit)


def pareto_frontier(
    costs: list[list[float]], sizes: list[list[int]]
) -> list[tuple[int, float, list[int]]]:
    """Every non-dominated (size, cost) of the allocations, by increasing size.

    Returns:
        (size, cost, choice per layer) with sizes strictly increasing and costs strictly
        decreasing: each point is the best allocation within its size.
    """
    t = _table(costs, sizes)
    out: list[tuple[int, float, list[int]]] = []
    best = np.inf
    for s in np.flatnonzero(np.isfinite(t.best)):
        if t.best[s] < best:
            best = float(t.best[s])
            out.append((t.base + int(s) * t.unit, best, _backtrack(t, int(s))))
    return out
