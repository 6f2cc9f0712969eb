"""Ranks for a size budget: optimal by brute force on small cases, the greedy bound, sizes, bad budgets."""

import itertools

import numpy as np
import pytest

from library.errors import ConfigError
from library.resize import budget
from library.resize.budget import BudgetModule, choose_ranks, parse_size


def random_modules(seed: int, count: int = 3, max_rank: int = 4) -> list[BudgetModule]:
    rng = np.random.default_rng(seed)
    modules = []
    for i in range(count):
        rank = int(rng.integers(1, max_rank + 1))
        energies = np.sort(rng.random(rank) ** 3 * rng.random() * 10)[::-1]
        modules.append(BudgetModule(f"m{i}", energies, int(rng.choice([6, 10, 14, 22]))))
    return modules


def brute_force(modules: list[BudgetModule], limit: int) -> float:
    best = -1.0
    for ranks in itertools.product(*(range(1, len(m.energies) + 1) for m in modules)):
        if sum(r * m.bytes_per_rank for r, m in zip(ranks, modules)) <= limit:
            best = max(best, sum(float(m.energies[:r].sum()) for r, m in zip(ranks, modules)))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_chosen_ranks_are_optimal_for_the_budget(seed):
    modules = random_modules(seed, count=4)
    full = sum(len(m.energies) * m.bytes_per_rank for m in modules)
    minimum = sum(m.bytes_per_rank for m in modules)
    limit = minimum + (full - minimum) * (seed % 5 + 1) // 6
    choice = choose_ranks(modules, limit)
    assert choice.exact
    assert sum(choice.ranks[m.name] * m.bytes_per_rank for m in modules) <= limit
    assert choice.kept_energy == pytest.approx(brute_force(modules, limit), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_fits_and_stays_below_the_bound(seed, monkeypatch):
    monkeypatch.setattr(budget, "EXACT_CELLS", 0)
    modules = random_modules(seed + 100, count=5, max_rank=5)
    minimum = sum(m.bytes_per_rank for m in modules)
    limit = minimum + 40
    choice = choose_ranks(modules, limit)
    optimum = brute_force(modules, limit)
    assert not choice.exact
    assert sum(choice.ranks[m.name] * m.bytes_per_rank for m in modules) <= limit
    assert choice.kept_energy <= optimum + 1e-12 <= choice.upper_bound + 2e-12
    largest_item = max(float(e) for m in modules for e in m.energies[1:])
    assert choice.kept_energy >= optimum - largest_item  # greedy loses at most one value per skipped module


def test_budget_below_rank_one_everywhere_is_refused():
    modules = random_modules(0)
    with pytest.raises(ConfigError, match="rank 1 in every module needs"):
        choose_ranks(modules, sum(m.bytes_per_rank for m in modules) - 1)


@pytest.mark.parametrize(
    "text, expected", [("50MB", 50_000_000), ("48MiB", 48 * 2**20), ("1.5GB", 1_500_000_000), ("1234", 1234)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_refuses_nonsense():
    with pytest.raises(ConfigError, match="is not a size"):
        parse_size("50 parsecs")
