"""Theseus progressive module replacement (BERT-of-Theseus), for any pair of interchangeable modules.

Training starts from the frozen original network (the *predecessor*) and swaps in trainable compact
modules (the *successors*) at random: each step every replaceable unit independently uses its
successor with probability ``p(t) = min(1, k*t + b)``, so the successors learn to work inside the
original network before they have to work alone. Evaluation always uses the successors.

A unit is anything with a ``use_successor`` attribute that its forward reads: a
:class:`TheseusModule` wrapping two interchangeable modules (an FFN and its narrow replacement), or
a unit of a hybrid network such as ``library.distill.hybrid.TheseusUNet``. The
:class:`TheseusController` sets those flags once per step from a generator seeded by
``(seed, step)`` alone, so every DDP rank draws the same units without communication, and a resumed
run repeats the draws of the run it continues.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from library.errors import ConfigError

SCHEDULE_HELP = "'constant:P' (0 <= P <= 1) or 'linear:K,B' (p = min(1, K*step + B), K >= 0, 0 <= B <= 1)"


@dataclass(frozen=True)
class ReplacementSchedule:
    """Replacement probability ``p(t) = min(1, slope*t + start)``; ``constant:p`` has slope 0."""

    slope: float
    start: float

    def probability(self, step: int) -> float:
        return min(1.0, self.slope * step + self.start)


def parse_replacement_schedule(text: str, flag: str = "--theseus_schedule") -> ReplacementSchedule:
    """Read ``constant:P`` or ``linear:K,B`` (BERT-of-Theseus' two schedulers)."""
    kind, _, values = text.strip().partition(":")
    try:
        numbers = [float(v) for v in values.split(",")] if values else []
    except ValueError:
        raise ConfigError(f"{flag} '{text}': values must be numbers; use {SCHEDULE_HELP}") from None
    if kind == "constant" and len(numbers) == 1:
        slope, start = 0.0, numbers[0]
    elif kind == "linear" and len(numbers) == 2:
        slope, start = numbers
    else:
        raise ConfigError(f"{flag} '{text}' is not a replacement schedule; use {SCHEDULE_HELP}")
    if not (0.0 <= start <= 1.0 and slope >= 0.0):
        raise ConfigError(f"{flag} '{text}' gives probabilities outside [0, 1]; use {SCHEDULE_HELP}")
    return ReplacementSchedule(slope, start)


class Replaceable(Protocol):
    """A unit whose forward uses its successor when ``use_successor`` is true."""

    use_successor: bool


@dataclass(frozen=True)
class ReplacementState:
    """What one step drew, for logging: ``p(t)`` and the fraction of units actually replaced."""

    probability: float
    rate: float
    use_successor: tuple[bool, ...]


def draw_replacements(num_units: int, probability: float, seed: int, step: int, micro_step: int = 0) -> torch.Tensor:
    """One Bernoulli(p) per unit, a pure function of ``(seed, step, micro_step)``.

    Deriving the generator from the step instead of advancing one shared generator is what makes
    ranks agree and resumes exact without saving any sampler state.
    """
    # splitmix-style mixing keeps nearby (seed, step) pairs from giving correlated streams.
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + micro_step * 0x94D049BB133111EB) % (2**63)
    generator = torch.Generator().manual_seed(mixed)
    return torch.rand(num_units, generator=generator) < probability


class TheseusController:
    """Sets each unit's ``use_successor`` flag every step; ``finish()`` switches to successors only."""

    def __init__(self, units: Sequence[Replaceable], schedule: ReplacementSchedule, seed: int) -> None:
        if not units:
            raise ConfigError("Theseus replacement needs at least one replaceable unit; the student has none")
        self.units = list(units)
        self.schedule = schedule
        self.seed = seed
        self.successor_only = False
        self.last_state: ReplacementState | None = None

    def step(self, step: int, micro_step: int = 0) -> ReplacementState:
        """Draw and apply this forward pass's replacements; call before every training forward.

        ``step`` is the optimizer step (the schedule's t); pass the gradient-accumulation index as
        ``micro_step`` to draw afresh for every micro-batch.
        """
        probability = 1.0 if self.successor_only else self.schedule.probability(step)
        mask = draw_replacements(len(self.units), probability, self.seed, step, micro_step).tolist()
        for unit, use_successor in zip(self.units, mask):
            unit.use_successor = use_successor
        self.last_state = ReplacementState(probability, sum(mask) / len(mask), tuple(mask))
        return self.last_state

    def finish(self) -> None:
        """Final phase (and inference): every unit uses its successor from now on."""
        self.successor_only = True
        for unit in self.units:
            unit.use_successor = True

    @property
    def replacement_rate(self) -> float:
        """Fraction of units replaced in the latest draw (1.0 once finished)."""
        if self.successor_only:
            return 1.0
        return self.last_state.rate if self.last_state is not None else 0.0


class TheseusModule(nn.Module):
    """Two interchangeable modules; the frozen predecessor runs until the controller picks the successor.

    In eval mode the successor always runs, as in BERT-of-Theseus: the predecessor only exists to
    train the successor in context.
    """

    def __init__(self, predecessor: nn.Module, successor: nn.Module) -> None:
        super().__init__()
        self.predecessor = predecessor.requires_grad_(False).eval()
        self.successor = successor
        self.use_successor = False

    def forward(self, *args, **kwargs):
        if self.use_successor or not self.training:
            return self.successor(*args, **kwargs)
        return self.predecessor(*args, **kwargs)

    def train(self, mode: bool = True) -> TheseusModule:
        super().train(mode)
        self.predecessor.eval()
        return self


def wrap_with_successors(model: nn.Module, successors: dict[str, nn.Module]) -> list[TheseusModule]:
    """Replace each named submodule of ``model`` by a :class:`TheseusModule` (in place); returns the units."""
    units = []
    for name, successor in successors.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        unit = TheseusModule(getattr(parent, child), successor)
        setattr(parent, child, unit)
        units.append(unit)
    return units


def collapse_to_successors(model: nn.Module, inplace: bool = True) -> nn.Module:
    """The compact model: every :class:`TheseusModule` replaced by its successor (for saving/export)."""
    model = model if inplace else copy.deepcopy(model)
    if isinstance(model, TheseusModule):
        return model.successor
    wrapped = [name for name, module in model.named_modules() if isinstance(module, TheseusModule)]
    # Innermost first, so that the names of wrappers nested in a successor are still valid.
    for name in reversed(wrapped):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).successor)
    return model
