"""Block-output features for feature KD: which student block matches which teacher tensor, and hooks.

Pairs (distill.md §2.2, §8):

* every down block whose output has the teacher's shape (it kept its downsampler), by name;
* the mid block, when both UNets have one (Segmind's choice; BK-SDM skips it);
* every up block, with the teacher block it was copied from;
* a student bottom block that lost the teacher's downsampler (BK-Tiny's ``down_blocks.2``) is
  matched with the tensor that enters the mirrored teacher up block, i.e. the output of the teacher
  up block one stage deeper (Segmind-Tiny's alignment: teacher ``up_blocks.0`` output); that is
  what the copied up block was trained to receive.

Hooks record only inside :meth:`FeatureHooks.capture`, into a dict that belongs to that call, so
nothing survives a step, gradient-checkpoint recomputation in backward records nothing, and the
hooks sit on the plain modules, so DDP wrapping changes no names.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from library.distill.block_map import num_stages, up_index


@dataclass(frozen=True)
class FeaturePair:
    """A student module whose output is trained towards a teacher module's output."""

    student: str
    teacher: str


def feature_pairs(student: UNet2DConditionModel, teacher: UNet2DConditionModel) -> list[FeaturePair]:
    """The matched block outputs, in forward order (down, mid, up)."""
    down, mid, up = [], [], []
    for stage in range(num_stages(student)):
        name = f"down_blocks.{stage}"
        if _has_downsampler(student.down_blocks[stage]) == _has_downsampler(teacher.down_blocks[stage]):
            down.append(FeaturePair(name, name))
        elif stage + 1 < num_stages(teacher):
            down.append(FeaturePair(name, f"up_blocks.{up_index(teacher, stage + 1)}"))
        up.append(FeaturePair(f"up_blocks.{up_index(student, stage)}", f"up_blocks.{up_index(teacher, stage)}"))
    if student.mid_block is not None and teacher.mid_block is not None and num_stages(student) == num_stages(teacher):
        mid.append(FeaturePair("mid_block", "mid_block"))
    return down + mid + up[::-1]


def _has_downsampler(block: nn.Module) -> bool:
    return getattr(block, "downsamplers", None) is not None


class FeatureHooks:
    """Forward hooks on named submodules that record their outputs during :meth:`capture`.

    Pass the unwrapped model (``accelerator.unwrap_model``): the hooks live on its submodules, which
    DDP shares, so names never carry a ``module.`` prefix.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.names = list(dict.fromkeys(names))
        self._store: dict[str, torch.Tensor] | None = None
        self._handles = [model.get_submodule(name).register_forward_hook(self._hook(name)) for name in self.names]

    def _hook(self, name: str):
        def record(module: nn.Module, inputs, output) -> None:
            if self._store is not None:
                # Down blocks return (hidden_states, skip tensors); the block output is the first.
                self._store[name] = output[0] if isinstance(output, tuple) else output

        return record

    @contextmanager
    def capture(self, require_all: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Record the hooked outputs of the forward run inside the block into the yielded dict.

        ``require_all`` checks that every hooked module ran; a Theseus hybrid forward, which skips
        the student blocks it replaced by teacher blocks, passes False.
        """
        if self._store is not None:
            raise RuntimeError("FeatureHooks.capture() is not reentrant")
        store: dict[str, torch.Tensor] = {}
        self._store = store
        try:
            yield store
        finally:
            self._store = None
        missing = [name for name in self.names if name not in store]
        if require_all and missing:
            raise RuntimeError(f"hooked modules did not run during the forward: {', '.join(missing)}")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
