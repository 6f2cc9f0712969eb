import re

import pytest
import torch
from diffusers import UNet2DConditionModel

from library.distill.block_map import init_student_from_teacher
from library.distill.students import build_student, student_config


def bk_sdm_source(student_key: str, name: str) -> str:
    """BK-SDM's published copy map (distill.md §1.3), written out independently of block_map."""
    match = re.match(r"up_blocks\.(\d+)\.(.*)", student_key)
    if not match:
        return student_key  # down blocks keep index 0, stems and mid block keep their names
    block, rest = int(match.group(1)), match.group(2)
    rest = re.sub(r"^(resnets|attentions)\.1\.", r"\1.2.", rest)
    return f"up_blocks.{block + 1 if name == 'bk_tiny' else block}.{rest}"


@pytest.mark.parametrize("name", ["bk_base", "bk_small", "bk_tiny"])
@pytest.mark.parametrize("v2", [False, True])
def test_student_weights_are_the_teachers_mapped_blocks(sd1_teacher, sd2_teacher, name, v2):
    teacher = sd2_teacher if v2 else sd1_teacher
    student, report = build_student(teacher, student_config(teacher.config, name))
    teacher_state = teacher.state_dict()
    for key, tensor in student.state_dict().items():
        source = bk_sdm_source(key, name)
        assert report.copied[key] == source
        assert torch.equal(tensor, teacher_state[source]), key
    assert set(report.copied) == set(student.state_dict())
    assert set(report.unused_teacher_keys) == set(teacher_state) - set(report.copied.values())


def test_tiny_student_drops_the_innermost_stage_and_keeps_the_outer_upsamplers(sd1_teacher):
    student, report = build_student(sd1_teacher, student_config(sd1_teacher.config, "bk_tiny"))
    assert report.copied["up_blocks.0.upsamplers.0.conv.weight"] == "up_blocks.1.upsamplers.0.conv.weight"
    assert student.down_blocks[2].downsamplers is None
    assert student.up_blocks[2].upsamplers is None
    dropped = set(report.unused_teacher_keys)
    assert {k for k in sd1_teacher.state_dict() if k.startswith(("down_blocks.3.", "mid_block.", "up_blocks.0."))} <= (
        dropped
    )
    assert "down_blocks.2.downsamplers.0.conv.weight" in dropped


def test_meta_built_student_owns_fresh_tensors(sd1_teacher):
    student, _ = build_student(sd1_teacher, student_config(sd1_teacher.config, "bk_base"), dtype=torch.float64)
    teacher_pointers = {t.data_ptr() for t in sd1_teacher.state_dict().values()}
    assert all(p.dtype == torch.float64 and p.data_ptr() not in teacher_pointers for p in student.parameters())
    assert all(p.requires_grad for p in student.parameters())


def test_init_copies_into_an_existing_student_in_place(sd1_teacher):
    student = UNet2DConditionModel.from_config(student_config(sd1_teacher.config, "bk_small"))
    parameters = list(student.parameters())
    report = init_student_from_teacher(student, sd1_teacher)
    assert all(a is b for a, b in zip(parameters, student.parameters()))
    teacher_state = sd1_teacher.state_dict()
    for key, tensor in student.state_dict().items():
        assert torch.equal(tensor, teacher_state[bk_sdm_source(key, "bk_small")])
    assert "student initialised from teacher" in report.summary()
