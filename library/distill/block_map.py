"""Which teacher block each student block comes from: BK-SDM's block-removal map, derived from the modules.

The map is computed from the two UNets' actual block lists rather than from preset names, so it
serves BK-Base/Small/Tiny of SD1.x and SD2.x and any custom student that only drops layers, the
mid block or inner stages:

* down stage ``i`` keeps the teacher's first resnets/attentions (``resnets.j <- resnets.j``);
* an up stage keeps the teacher's first resnets/attentions plus its *last* one, because the last
  up resnet consumes the skip from the stage above (``resnets.1 <- resnets.2`` when 3 -> 2);
* a student with fewer stages drops the teacher's innermost ones, so student up block ``u`` comes
  from teacher up block ``u + (teacher stages - student stages)`` (BK-Tiny);
* everything else (stems, the mid block, samplers) keeps its name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

from library.errors import ConfigError

UNMAPPABLE_HINT = (
    "a student initialised from the teacher may only drop resnet/attention layers, the mid block or "
    "inner stages; channels, heads, block types and cross-attention width must match the teacher's"
)


@dataclass(frozen=True)
class CopyReport:
    """Result of :func:`init_student_from_teacher`: every student tensor and its teacher source."""

    copied: dict[str, str]
    unused_teacher_keys: tuple[str, ...]

    @property
    def renamed(self) -> dict[str, str]:
        return {s: t for s, t in self.copied.items() if s != t}

    def summary(self) -> str:
        return (
            f"student initialised from teacher: {len(self.copied)} tensors copied "
            f"({len(self.renamed)} from renamed blocks), {len(self.unused_teacher_keys)} teacher tensors dropped"
        )


def num_stages(unet: UNet2DConditionModel) -> int:
    return len(unet.down_blocks)


def up_index(unet: UNet2DConditionModel, stage: int) -> int:
    """Index of the up block that mirrors down stage ``stage``."""
    return num_stages(unet) - 1 - stage


def _layer_renames(prefix_s: str, prefix_t: str, student_count: int, teacher_count: int, up: bool) -> list:
    if student_count > teacher_count:
        raise ConfigError(
            f"student {prefix_s} has {student_count} layers but teacher {prefix_t} only {teacher_count}; "
            + UNMAPPABLE_HINT
        )
    pairs = [(j, j) for j in range(student_count)]
    if up and student_count:
        pairs[-1] = (student_count - 1, teacher_count - 1)
    return [(f"{prefix_s}.{j_s}.", f"{prefix_t}.{j_t}.") for j_s, j_t in pairs]


def _stage_renames(block_s, block_t, name_s: str, name_t: str, up: bool) -> list[tuple[str, str]]:
    renames = [(f"{name_s}.", f"{name_t}.")]
    for part in ("resnets", "attentions"):
        layers_s, layers_t = getattr(block_s, part, None), getattr(block_t, part, None)
        if layers_s is not None and layers_t is not None:
            renames += _layer_renames(f"{name_s}.{part}", f"{name_t}.{part}", len(layers_s), len(layers_t), up)
    return renames


def module_renames(student: UNet2DConditionModel, teacher: UNet2DConditionModel) -> list[tuple[str, str]]:
    """``(student prefix, teacher prefix)`` pairs for the blocks whose source has another name.

    Longer prefixes win; names not covered map to themselves.
    """
    n_s, n_t = num_stages(student), num_stages(teacher)
    if not 0 < n_s <= n_t:
        raise ConfigError(f"student has {n_s} stages and teacher {n_t}; {UNMAPPABLE_HINT}")
    renames = []
    for stage in range(n_s):
        name = f"down_blocks.{stage}"
        renames += _stage_renames(student.down_blocks[stage], teacher.down_blocks[stage], name, name, up=False)
        u_s, u_t = up_index(student, stage), up_index(teacher, stage)
        renames += _stage_renames(
            student.up_blocks[u_s], teacher.up_blocks[u_t], f"up_blocks.{u_s}", f"up_blocks.{u_t}", up=True
        )
    return renames


def teacher_key(student_key: str, renames: list[tuple[str, str]]) -> str:
    best = max((r for r in renames if student_key.startswith(r[0])), key=lambda r: len(r[0]), default=None)
    return student_key if best is None else best[1] + student_key[len(best[0]) :]


def weight_map(student: UNet2DConditionModel, teacher: UNet2DConditionModel) -> dict[str, str]:
    """Student state-dict key -> teacher key, checked for existence and shape (works on meta tensors)."""
    renames = module_renames(student, teacher)
    teacher_state = teacher.state_dict()
    mapping = {}
    for key, tensor in student.state_dict().items():
        source = teacher_key(key, renames)
        if source not in teacher_state:
            raise ConfigError(f"student tensor '{key}' has no teacher counterpart ('{source}'); {UNMAPPABLE_HINT}")
        if teacher_state[source].shape != tensor.shape:
            raise ConfigError(
                f"student tensor '{key}' {tuple(tensor.shape)} cannot come from teacher '{source}' "
                f"{tuple(teacher_state[source].shape)}; {UNMAPPABLE_HINT}"
            )
        mapping[key] = source
    return mapping


def init_student_from_teacher(
    student: UNet2DConditionModel, teacher: UNet2DConditionModel, dtype: torch.dtype | None = None
) -> CopyReport:
    """Copy every student tensor from its teacher block (BK-SDM's initialisation), in place.

    A student built on the meta device (``accelerate.init_empty_weights``) gets fresh tensors of
    ``dtype`` (default: the teacher's); a materialised one keeps its tensors and dtype, so an
    optimizer made earlier stays valid. The student never shares storage with the teacher.
    """
    mapping = weight_map(student, teacher)
    teacher_state = teacher.state_dict()
    on_meta = any(p.is_meta for p in student.parameters())
    with torch.no_grad():
        state = {
            key: teacher_state[source].detach().to(dtype=dtype, copy=True) if on_meta else teacher_state[source]
            for key, source in mapping.items()
        }
        student.load_state_dict(state, strict=True, assign=on_meta)
    used = set(mapping.values())
    unused = tuple(k for k in teacher_state if k not in used)
    return CopyReport(copied=mapping, unused_teacher_keys=unused)
