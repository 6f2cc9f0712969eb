"""A UNet that runs each stage from the teacher or from the student: Theseus for block-removed students.

Why not per-layer units: a UNet stage is not a residual function. Every down resnet (and
downsampler) emits a skip tensor that the mirrored up stage consumes, one per up resnet, so a BK
student stage (1 down layer, 2 up layers) cannot stand in for a teacher stage (2 and 3) on one
side only. What has the teacher's interface is a *stage pair*: down block ``i``, everything inside
it, and the mirrored up block. Seen that way the UNet is recursive::

    stage(i)(x) = up_i(stage(i+1)(down_i(x)), skips = [x, down_i's layer outputs])

and the input ``x`` and output of ``stage(i)`` have the same shapes in teacher and student, so
each stage pair is one replaceable unit, and inner stages are drawn independently of outer ones.

Units per student (SD1.x/SD2.x teacher, 4 stages + mid block):

* bk_base: 4 stage pairs + the mid block (teacher mid vs the student's copy) = 5 units;
* bk_small: 4 stage pairs + the mid block (teacher mid vs nothing) = 5 units;
* bk_tiny: 3 stage pairs; the student's innermost pair (stage 2, which lost its downsampler)
  stands for the teacher's stage 2 *with* stages 3 and the mid block inside it, which have no
  student counterpart and therefore run whenever the teacher's stage 2 does.

A student that keeps every stage and layer (e.g. a deep copy of the teacher, or a narrow-FFN
student) gets the same stage-pair units; finer units such as single FFNs are
``library.training.theseus.TheseusModule``'s job.

The stems (time embedding, ``conv_in``, ``conv_out``) are always the student's: they are copies of
the teacher's at initialisation and are trained with the rest of the student. The teacher is
borrowed, not owned: it is the frozen KD teacher, not a submodule, so it is neither saved with
this module nor synchronised by DDP, and ``train()`` cannot take it out of eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from library.distill.block_map import module_renames, num_stages, up_index
from library.errors import ConfigError

_UNSUPPORTED_KEYS = ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "time_cond_proj_dim")


@dataclass(eq=False)
class StageUnit:
    """One replaceable unit; ``use_successor`` is set by ``library.training.theseus.TheseusController``."""

    name: str
    use_successor: bool = False


class TheseusUNet(nn.Module):
    """Teacher/student hybrid whose units switch between the two networks each step.

    ``forward`` matches ``UNet2DConditionModel``'s for SD training calls
    ``(sample, timestep, encoder_hidden_states)``. In eval mode every unit uses the student.
    """

    def __init__(self, teacher: UNet2DConditionModel, student: UNet2DConditionModel) -> None:
        super().__init__()
        for key in _UNSUPPORTED_KEYS:
            if teacher.config.get(key) is not None or student.config.get(key) is not None:
                raise ConfigError(f"Theseus replacement supports SD1.x/SD2.x UNets only (the model sets {key})")
        module_renames(student, teacher)  # raises if the student's stages cannot stand for the teacher's
        self.student = student
        # Plain attribute on purpose (see the module docstring): not registered as a submodule.
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())
        n_s = num_stages(student)
        self.stage_units = [StageUnit(f"down_blocks.{i}+up_blocks.{up_index(teacher, i)}") for i in range(n_s)]
        has_mid = teacher.mid_block is not None or student.mid_block is not None
        self.mid_unit = StageUnit("mid_block") if has_mid and n_s == num_stages(teacher) else None
        self.units = self.stage_units + ([self.mid_unit] if self.mid_unit is not None else [])

    def train(self, mode: bool = True) -> TheseusUNet:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple:
        stems = self.student
        emb = stems.time_embedding(stems.get_time_embed(sample=sample, timestep=timestep))
        hidden = stems.conv_in(sample)
        hidden = self._stage(0, hidden, emb, encoder_hidden_states, out_size=None).to(stems.dtype)
        if stems.conv_norm_out is not None:
            hidden = stems.conv_act(stems.conv_norm_out(hidden))
        hidden = stems.conv_out(hidden)
        return UNet2DConditionOutput(sample=hidden) if return_dict else (hidden,)

    def _uses_student(self, unit: StageUnit | None) -> bool:
        return unit is not None and (unit.use_successor or not self.training)

    def _stage(self, stage: int, x: torch.Tensor, emb, context, out_size) -> torch.Tensor:
        """Down block ``stage``, the stages inside it, and its mirrored up block (upsampled to ``out_size``)."""
        unit = self.stage_units[stage] if stage < len(self.stage_units) else None  # inner teacher-only stages
        net = self.student if self._uses_student(unit) else self.teacher
        hidden, skips = _call(net.down_blocks[stage], x, emb, context)
        if _has_downsampler(net.down_blocks[stage]):
            # The downsampler's output is the next stage's input, which that stage's up block reads as x.
            hidden = self._stage(stage + 1, hidden, emb, context, out_size=x.shape[-2:])
            skips = skips[:-1]
        else:
            hidden = self._middle(net, hidden, emb, context)
        up_block = net.up_blocks[up_index(net, stage)]
        return _call(up_block, hidden, emb, context, res_hidden_states_tuple=(x, *skips), upsample_size=out_size)

    def _middle(self, net: UNet2DConditionModel, hidden, emb, context) -> torch.Tensor:
        if self.mid_unit is not None:
            net = self.student if self._uses_student(self.mid_unit) else self.teacher
        if net.mid_block is None:
            return hidden
        return _call(net.mid_block, hidden, emb, context)


def _has_downsampler(block: nn.Module) -> bool:
    return getattr(block, "downsamplers", None) is not None


def _call(block: nn.Module, hidden: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, **kwargs):
    """Run a diffusers down/mid/up block, with the text context only if it has cross-attention."""
    # Teacher and student may run in different precisions; each block gets inputs in its own.
    dtype = next(block.parameters()).dtype
    if "res_hidden_states_tuple" in kwargs:
        kwargs["res_hidden_states_tuple"] = tuple(t.to(dtype) for t in kwargs["res_hidden_states_tuple"])
    if getattr(block, "has_cross_attention", False):
        kwargs["encoder_hidden_states"] = context.to(dtype)
    return block(hidden_states=hidden.to(dtype), temb=emb.to(dtype), **kwargs)
