"""The exact knapsack search against brute force; frontier shape; exact byte sizes."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from sotool.algos.pack import pack_int32
from sotool.algos.search import allocate, pareto_frontier, quantized_layer_bytes


def _random_problem(rng: random.Random, layers: int, choices: int):
    costs = [[rng.uniform(0, 10) for _ in range(choices)] for _ in range(layers)]
    sizes = [[rng.randrange(100, 5000) * 4 for _ in range(choices)] for _ in range(layers)]
    return costs, sizes


def _brute(costs, sizes, budget):
    best = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        s = sum(sizes[i][j] for i, j in enumerate(combo))
        if s > budget:
            continue
        c = sum(costs[i][j] for i, j in enumerate(combo))
        if best is None or c < best[0] - 1e-12:
            best = (c, s)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_search_equals_brute_force(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 6)
    costs, sizes = _random_problem(rng, layers, 3)
    lo = sum(min(s) for s in sizes)
    hi = sum(max(s) for s in sizes)
    budget = rng.randint(lo, hi)
    got = allocate(costs, sizes, budget)
    want = _brute(costs, sizes, budget)
    assert got.cost == pytest.approx(want[0], rel=1e-12, abs=1e-12)
    # the reported size and cost are those of the returned choices, within the budget
    assert got.size == sum(sizes[i][j] for i, j in enumerate(got.choice)) <= budget
    assert got.cost == pytest.approx(sum(costs[i][j] for i, j in enumerate(got.choice)))


@pytest.mark.parametrize("seed", range(5))
def test_frontier_is_monotone_and_optimal(seed):
    rng = random.Random(100 + seed)
    costs, sizes = _random_problem(rng, 5, 3)
    front = pareto_frontier(costs, sizes)
    assert len(front) >= 2
    for (s0, c0, _), (s1, c1, _) in itertools.pairwise(front):
        assert s1 > s0 and c1 < c0
    for size, cost, choice in front:
        assert size == sum(sizes[i][j] for i, j in enumerate(choice))
        assert cost == pytest.approx(sum(costs[i][j] for i, j in enumerate(choice)))
        assert cost == pytest.approx(_brute(costs, sizes, size)[0])
    # the cheapest-size point is the smallest model, the last is the unconstrained optimum
    assert front[0][0] == sum(min(s) for s in sizes)
    assert front[-1][1] == pytest.approx(sum(min(c) for c in costs))


def test_budget_met_exactly_in_bytes_with_real_layer_sizes():
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (192, 576), (576, 576)]
    cands = [(3, 64), (4, 64), (4, 128)]
    sizes = [[quantized_layer_bytes(r, c, b, g) for b, g in cands] for r, c in shapes]
    rng = random.Random(0)
    costs = [[rng.uniform(0, 1) for _ in cands] for _ in shapes]
    for budget in (sum(min(s) for s in sizes), sum(max(s) for s in sizes) - 1, 2_700_000):
        got = allocate(costs, sizes, budget)
        assert got.size == sum(sizes[i][j] for i, j in enumerate(got.choice)) <= budget
        assert got.cost == pytest.approx(_brute(costs, sizes, budget)[0])
    with pytest.raises(ValueError, match="below the smallest"):
        allocate(costs, sizes, sum(min(s) for s in sizes) - 1)


@pytest.mark.parametrize("bits,group", [(3, 64), (4, 128), (2, -1), (8, 32)])
def test_layer_bytes_match_packed_tensors(bits, group):
    rows, cols = 40, 96
    groups = 1 if group <= 0 else -(-cols // group)
    codes = torch.randint(0, 2**bits, (cols, rows))
    qweight = pack_int32(codes, bits, dim=0)
    qzeros = pack_int32(torch.randint(0, 2**bits, (groups, rows)), bits, dim=1)
    scales = torch.zeros(groups, rows, dtype=torch.float16)
    g_idx = torch.zeros(cols, dtype=torch.int32)
    total = sum(t.numel() * t.element_size() for t in (qweight, qzeros, scales, g_idx))
    assert quantized_layer_bytes(rows, cols, bits, group) == total
