"""Stopping a diverged run: a non-finite loss ends it at that step, and no non-finite weights are saved.

Without this a diverging learning rate turns the loss into NaN and every later checkpoint into NaN
weights, and the run still exits 0. Here the step is named, the last good checkpoint stays the
newest file, and the script exits with status 2 (a user-fixable cause: usually the learning rate).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator

from library.errors import SuiteError


class TrainingDivergedError(SuiteError, ArithmeticError):
    """The loss or the trained weights stopped being finite numbers."""


def _last_good(last_saved: Path | None) -> str:
    return f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written"


def loss_is_finite(loss: torch.Tensor, accelerator: Accelerator) -> bool:
    """Whether every process's loss is finite; all processes get the same answer, so all stop together."""
    bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad.to(accelerator.device), reduction="sum")
    return not bool(bad.item())


def raise_non_finite_loss(step: int, loss: float, last_saved: Path | None) -> None:
    raise TrainingDivergedError(
        f"the loss became {loss} at step {step}; training stopped and wrote nothing more "
        f"({_last_good(last_saved)}); lower --learning_rate or check the data"
    )


def check_finite_weights(parameters: Iterable[torch.Tensor], target: Path, step: int, last_saved: Path | None) -> None:
    """Refuse to write ``target`` when any trained value is NaN or infinite."""
    bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in parameters)
    if bad:
        raise TrainingDivergedError(
            f"the trained weights hold {bad} non-finite values at step {step}; {target.name} was not written "
            f"({_last_good(last_saved)}); lower --learning_rate"
        )
