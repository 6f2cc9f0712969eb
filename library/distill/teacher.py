"""The frozen teacher: eval mode, no gradients, optionally lower precision, with its KD targets.

Both anchors got this wrong in some way (distill.md §4.1): Segmind's teacher kept
``requires_grad``, stayed fp32 and was wrapped in DDP. Here the teacher is never handed to
``accelerator.prepare``; it is only moved to the device, and it returns float32 targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

from library.distill.features import FeatureHooks


@dataclass
class TeacherOutput:
    prediction: torch.Tensor
    features: dict[str, torch.Tensor]


class FrozenTeacher:
    """Runs the teacher UNet under ``no_grad`` and returns its prediction and hooked block outputs."""

    def __init__(
        self, unet: UNet2DConditionModel, feature_names: Sequence[str] = (), dtype: torch.dtype | None = None
    ) -> None:
        self.unet = unet.requires_grad_(False).eval()
        if dtype is not None:
            self.unet.to(dtype=dtype)
        self.hooks = FeatureHooks(self.unet, feature_names)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> TeacherOutput:
        """``added_cond_kwargs``: SDXL's pooled text and size numbers (cast to the teacher's dtype)."""
        extra = {}
        if added_cond_kwargs is not None:
            extra["added_cond_kwargs"] = {k: v.to(self.dtype) for k, v in added_cond_kwargs.items()}
        # no_grad rather than inference_mode: the targets enter the student's autograd graph.
        with torch.no_grad(), self.hooks.capture() as features:
            prediction = self.unet(
                sample.to(self.dtype), timestep, encoder_hidden_states.to(self.dtype), **extra
            ).sample
        return TeacherOutput(prediction.float(), features)
