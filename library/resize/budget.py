"""``--target_size`` / ``--target_ratio``: every module's rank chosen jointly so the file fits a size budget.

Keeping singular value ``s_ij`` of module ``i`` costs ``bytes_i = (out_i + in_i) * element size`` and
keeps ``(scale_i s_ij)^2`` of the update's Frobenius energy; every module keeps at least rank 1.
Maximising the energy kept within the budget is a knapsack whose items per module must be taken
as a prefix (singular values fall, so the best ranks are prefixes anyway):

* small problems (budget in units of the byte sizes' gcd times the ranks at most ``EXACT_CELLS``)
  are solved exactly by dynamic programming over the budget;
* larger ones greedily: all singular values of all modules in order of energy per byte, each
  taken if it still fits (a module whose next value does not fit takes no more). The energy the
  greedy choice leaves below the fractional optimum (an upper bound on the true optimum) is reported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import torch

from library.errors import ConfigError
from library.resize.rank_reduction import ModuleSpectrum, ResizeRequest, module_spectra, resized_metadata
from library.resize.report import TensorSpec, output_size

EXACT_CELLS = 20_000_000
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``50MB`` (decimal units), ``48MiB`` (binary units), ``1.5GB`` or a plain byte count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].upper() not in _UNITS:
        raise ConfigError(f"--target_size '{text}' is not a size: write e.g. 50MB, 48MiB, 1.5GB or a byte count")
    return int(float(match[1]) * _UNITS[match[2].upper()])


@dataclass(frozen=True)
class BudgetModule:
    """What the rank choice needs of a module: energies ``(scale s_j)^2`` (descending) and bytes per rank."""

    name: str
    energies: np.ndarray
    bytes_per_rank: int


@dataclass(frozen=True)
class BudgetChoice:
    ranks: dict[str, int]
    kept_energy: float
    total_energy: float
    upper_bound: float  # the fractional optimum: no choice within the budget keeps more
    exact: bool

    @property
    def kept_share(self) -> float:
        return self.kept_energy / self.total_energy if self.total_energy else 1.0


def _prefix_values(module: BudgetModule) -> np.ndarray:
    return np.cumsum(module.energies)


def _exact(modules: list[BudgetModule], budget: int, unit: int) -> list[int]:
    """Dynamic programming over the budget in ``unit`` bytes: best value per spent budget, ranks >= 1."""
    capacity = budget // unit
    best = np.zeros(capacity + 1)
    choices = []
    for module in modules:
        cost = module.bytes_per_rank // unit
        values = _prefix_values(module)
        new = np.full(capacity + 1, -np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int64)
        for rank in range(1, len(values) + 1):
            shift = rank * cost
            if shift > capacity:
                break
            candidate = np.full(capacity + 1, -np.inf)
            candidate[shift:] = best[: capacity + 1 - shift] + values[rank - 1]
            better = candidate > new
            new[better], pick[better] = candidate[better], rank
        best = new
        choices.append(pick)
    ranks, spent = [], int(np.argmax(best))
    for module, pick in zip(reversed(modules), reversed(choices)):
        rank = int(pick[spent])
        ranks.append(rank)
        spent -= rank * (module.bytes_per_rank // unit)
    return ranks[::-1]


def _greedy(modules: list[BudgetModule], budget: int) -> list[int]:
    ranks = [1] * len(modules)
    left = budget - sum(m.bytes_per_rank for m in modules)
    items = sorted(
        (-e / m.bytes_per_rank, i, j) for i, m in enumerate(modules) for j, e in enumerate(m.energies[1:], start=2)
    )
    closed = set()
    for _, i, j in items:
        if i in closed:
            continue
        cost = modules[i].bytes_per_rank
        if j == ranks[i] + 1 and cost <= left:
            ranks[i], left = j, left - cost
        else:
            closed.add(i)  # ranks are prefixes: once a value is skipped, the module takes no more
    return ranks


def _fractional_bound(modules: list[BudgetModule], budget: int) -> float:
    left = budget - sum(m.bytes_per_rank for m in modules)
    bound = sum(float(m.energies[0]) for m in modules)
    items = sorted(((e / m.bytes_per_rank, m.bytes_per_rank) for m in modules for e in m.energies[1:]), reverse=True)
    for density, cost in items:
        take = min(cost, left)
        bound += density * take
        left -= take
        if left <= 0:
            break
    return bound


def choose_ranks(modules: list[BudgetModule], budget: int) -> BudgetChoice:
    """The ranks that keep the most energy with ``Σ rank_i * bytes_per_rank_i <= budget``.

    :class:`ConfigError` if even rank 1 everywhere does not fit.
    """
    minimum = sum(m.bytes_per_rank for m in modules)
    if minimum > budget:
        raise ConfigError(
            f"the size budget leaves {max(budget, 0):,} bytes for the LoRA factors but rank 1 in every module needs "
            f"{minimum:,}: choose a larger --target_size/--target_ratio"
        )
    unit = math.gcd(*(m.bytes_per_rank for m in modules))
    cells = (budget // unit + 1) * sum(len(m.energies) for m in modules)
    exact = cells <= EXACT_CELLS
    ranks = _exact(modules, budget, unit) if exact else _greedy(modules, budget)
    kept = sum(float(_prefix_values(m)[r - 1]) for m, r in zip(modules, ranks))
    total = sum(float(m.energies.sum()) for m in modules)
    bound = kept if exact else _fractional_bound(modules, budget)
    return BudgetChoice({m.name: r for m, r in zip(modules, ranks)}, kept, total, bound, exact)


# Header digits grow a little with the ranks (shapes and data offsets): bytes kept aside per module.
_HEADER_SLACK_PER_MODULE = 48


def _budget_module(module: ModuleSpectrum, element_size: int) -> BudgetModule:
    scale = 1.0 if module.scale is None else module.scale
    energies = (module.spectrum.double() * scale).square().numpy()
    return BudgetModule(module.name, energies, (module.out_features + module.in_features) * element_size)


def plan_budget(
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str],
    request: ResizeRequest,
    target_bytes: int,
    label: str,
    save_dtype: torch.dtype,
    source: str,
    device: str | torch.device = "cpu",
) -> tuple[ResizeRequest, BudgetChoice, list[ModuleSpectrum]]:
    """The request that resizes ``state_dict`` to at most ``target_bytes`` (a safetensors file), and the choice."""
    spectra = module_spectra(state_dict, source, device)
    owned = {key for module in spectra for key in module.pair.keys}
    others: dict[str, TensorSpec] = {
        k: (save_dtype if v.is_floating_point() else v.dtype, tuple(v.shape))
        for k, v in state_dict.items()
        if k not in owned
    }
    element_size = torch.empty((), dtype=save_dtype).element_size()
    modules = [_budget_module(module, element_size) for module in spectra]
    planned = ResizeRequest(request.new_rank, keep_alpha=request.keep_alpha, module_ranks={}, budget_label=label)
    written = resized_metadata(metadata, planned, max(m.old_rank for m in spectra), 1.0)
    at_rank_one = output_size(spectra, [1] * len(spectra), others, written, save_dtype)
    fixed = at_rank_one - sum(m.bytes_per_rank for m in modules) + _HEADER_SLACK_PER_MODULE * len(modules)
    choice = choose_ranks(modules, target_bytes - fixed)
    return replace(planned, module_ranks=choice.ranks), choice, spectra


def budget_table(spectra: list[ModuleSpectrum], choice: BudgetChoice) -> str:
    """Per module: old and new rank and the share of its update's energy (Frobenius norm squared) kept."""
    width = max(len(m.name) for m in spectra)
    lines = [f"{'module':<{width}}  old  new  energy kept"]
    for module in spectra:
        rank = choice.ranks[module.name]
        squares = module.spectrum.double().square()
        share = float(squares[:rank].sum() / squares.sum()) if float(squares.sum()) > 0 else 1.0
        lines.append(f"{module.name:<{width}}  {module.old_rank:>3}  {rank:>3}  {share:>11.1%}")
    return "\n".join(lines)


def budget_summary(choice: BudgetChoice, label: str, size: int) -> str:
    how = (
        "exact optimum"
        if choice.exact
        else (
            f"greedy; the optimum keeps at most {choice.upper_bound / choice.total_energy:.2%}"
            if choice.total_energy
            else "greedy"
        )
    )
    return f"fits {label}: {size:,} bytes, {choice.kept_share:.2%} of the update energy kept ({how})"
