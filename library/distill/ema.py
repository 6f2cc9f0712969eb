"""Exponential moving average of the trained weights, on top of diffusers' ``EMAModel``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel


class TrainingEMA(EMAModel):
    """diffusers' EMAModel (decay warm-up, state_dict for ``accelerator.save_state``), adjusted for training runs.

    * The average is float32 even when the weights are half precision: with a decay of 0.9999 an
      update moves a bf16 value by less than its rounding step, so a bf16 average would never move.
    * ``load_state_dict`` keeps the average on the weights' device; accelerate loads checkpoints on the CPU.

    Build it from the *trained* parameters once they are initialised (BK-SDM built its EMA from the
    teacher's UNet).
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter], decay: float) -> None:
        super().__init__(parameters, decay=decay, foreach=True)
        self.to(dtype=torch.float32)

    def load_state_dict(self, state_dict: dict) -> None:
        device = self.shadow_params[0].device
        super().load_state_dict(state_dict)
        self.to(device=device, dtype=torch.float32)

    @contextmanager
    def averaged(self, parameters: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        """Inside the block the parameters hold the average; afterwards exactly their own values again."""
        self.store(parameters)
        self.copy_to(parameters)
        try:
            yield
        finally:
            self.restore(parameters)
