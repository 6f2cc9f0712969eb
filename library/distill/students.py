"""Student UNet configs (BK-SDM Base/Small/Tiny, Segmind's SSD-1B/Vega, or a custom json) and building a
student from its teacher.

A student is a plain diffusers ``UNet2DConditionModel`` whose config says exactly what it is, so
``UNet2DConditionModel.from_config(student.config)`` rebuilds it and a saved folder loads in any
diffusers pipeline (Segmind's script saved the teacher's config for its pruned model).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from library.distill.block_map import CopyReport, init_student_from_teacher
from library.distill.sdxl_students import SDXL_STUDENTS, is_sdxl_shaped, sdxl_preset_config
from library.errors import ConfigError

BK_STUDENTS = ("bk_base", "bk_small", "bk_tiny")  # SD1.x/SD2.x teachers
STUDENTS = BK_STUDENTS + SDXL_STUDENTS

# Per-stage config entries, listed in down-path order; diffusers reverses them for the up path,
# except the up-ordered ones below.
_DOWN_ORDERED = (
    "down_block_types",
    "block_out_channels",
    "layers_per_block",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "only_cross_attention",
)
_UP_ORDERED = ("up_block_types", "reverse_transformer_layers_per_block")
_UNET_KWARGS = frozenset(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}


def plain_config(config: Mapping) -> dict:
    """A UNet config as constructor kwargs (diffusers' bookkeeping keys such as ``_class_name`` dropped)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def _without_innermost_stage(config: dict) -> dict:
    if len(config["block_out_channels"]) < 2:
        raise ConfigError("--student bk_tiny: the teacher has a single stage, there is no inner stage to remove")
    for key in _DOWN_ORDERED:
        if isinstance(config.get(key), (list, tuple)):
            config[key] = list(config[key])[:-1]
    for key in _UP_ORDERED:
        if isinstance(config.get(key), (list, tuple)):
            config[key] = list(config[key])[1:]
    return config


def check_student_name(student: str) -> None:
    if student not in STUDENTS:
        choices = ", ".join(STUDENTS)
        raise ConfigError(f"--student '{student}' is unknown; choose one of {choices} or pass --student_config")


def preset_config(teacher_config: Mapping, student: str) -> dict:
    """BK-SDM's student of an SD1.x/SD2.x teacher (distill.md §1.2, §1.5): base = one layer per down
    stage, small = base without mid block, tiny = small without the innermost stage; or Segmind's
    SSD-1B/Vega of an SDXL teacher (``sdxl_students``)."""
    check_student_name(student)
    config = plain_config(teacher_config)
    if student in SDXL_STUDENTS:
        return sdxl_preset_config(teacher_config, student, config)
    if is_sdxl_shaped(teacher_config):
        raise ConfigError(
            f"--student {student} is a BK-SDM student of SD1.x/SD2.x; the teacher is SDXL "
            f"(use {' or '.join(SDXL_STUDENTS)})"
        )
    config["layers_per_block"] = 1
    if student in ("bk_small", "bk_tiny"):
        config["mid_block_type"] = None
    if student == "bk_tiny":
        config = _without_innermost_stage(config)
    return config


def read_student_config_file(path: str | os.PathLike, flag: str = "--student_config") -> dict:
    """UNet2DConditionModel kwargs from a json file (a saved ``config.json`` works too)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{flag} '{path}' cannot be read: {err.strerror}") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{flag} '{path}' is not valid json: {err.msg} at line {err.lineno}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} '{path}' must hold a json object of UNet2DConditionModel arguments")
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(data) - _UNET_KWARGS)
    if unknown:
        raise ConfigError(f"{flag} '{path}': '{unknown[0]}' is not a UNet2DConditionModel argument")
    return data


def student_config(
    teacher_config: Mapping, student: str | None = None, student_config_file: str | os.PathLike | None = None
) -> dict:
    """The student's diffusers config: a preset (``--student``), then the keys of ``--student_config``.

    Keys in the json replace the preset's (or, without ``--student``, the teacher's), so a custom
    student is usually a few keys such as ``{"layers_per_block": [1, 1, 2, 2]}``.
    """
    if student is None and student_config_file is None:
        raise ConfigError(f"pass --student ({', '.join(STUDENTS)}) or --student_config FILE")
    config = preset_config(teacher_config, student) if student is not None else plain_config(teacher_config)
    if student_config_file is not None:
        config.update(read_student_config_file(student_config_file))
    return config


def build_student(
    teacher: UNet2DConditionModel, config: Mapping, dtype: torch.dtype | None = None
) -> tuple[UNet2DConditionModel, CopyReport]:
    """The student UNet, initialised from the teacher's blocks (no random init is spent on it)."""
    try:
        with init_empty_weights():
            student = UNet2DConditionModel.from_config(dict(config))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"student config is not a valid UNet2DConditionModel: {str(err).splitlines()[0]}") from err
    report = init_student_from_teacher(student, teacher, dtype=dtype)
    return student, report
