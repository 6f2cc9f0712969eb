import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from library.distill.features import FeatureHooks, feature_pairs
from library.distill.hybrid import TheseusUNet
from library.distill.students import build_student, plain_config, student_config
from library.errors import ConfigError
from library.training.theseus import ReplacementSchedule, TheseusController


def inputs(size=(16, 16), batch=2):
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(batch, 4, *size, generator=generator)
    context = torch.randn(batch, 77, 64, generator=generator)
    return sample, torch.tensor([30, 800][:batch]), context


def set_units(hybrid, mask):
    for unit, use_successor in zip(hybrid.units, mask):
        unit.use_successor = bool(use_successor)


def reference_unet(teacher, student, student_stages, mid_from_student):
    """The hybrid as one plain diffusers UNet: per-stage layer counts, each stage's weights from its source.

    Independent of TheseusUNet's recursion: diffusers' own forward wires the skips.
    """
    n_t, n_s = len(teacher.down_blocks), len(student.down_blocks)
    depth = n_s if n_s - 1 in student_stages else n_t
    source = {s: student if s in student_stages else teacher for s in range(depth)}
    mid_net = (student if mid_from_student else teacher) if n_s == n_t else (student if depth == n_s else teacher)
    config = plain_config((student if depth == n_s else teacher).config)
    config["layers_per_block"] = [len(source[s].down_blocks[s].resnets) for s in range(depth)]
    config["mid_block_type"] = mid_net.config.mid_block_type
    reference = UNet2DConditionModel(**config)
    states = {id(net): net.state_dict() for net in (teacher, student)}
    state = {}
    for key in reference.state_dict():
        kind, _, rest = key.partition(".")
        if kind == "down_blocks":
            net, source_key = source[int(rest.split(".")[0])], key
        elif kind == "up_blocks":
            index, _, tail = rest.partition(".")
            stage = depth - 1 - int(index)
            net = source[stage]
            source_key = f"up_blocks.{len(net.down_blocks) - 1 - stage}.{tail}"
        elif kind == "mid_block":
            net, source_key = mid_net, key
        else:
            net, source_key = student, key  # stems come from the student
        state[key] = states[id(net)][source_key]
    reference.load_state_dict(state, strict=True)
    return reference


def test_identical_copies_give_the_teachers_output_at_any_p(sd1_teacher):
    """Acceptance test: Theseus with student = deep copy of the teacher is numerically the teacher."""
    sample, timestep, context = inputs()
    with torch.no_grad():
        expected = sd1_teacher(sample, timestep, context).sample
    hybrid = TheseusUNet(sd1_teacher, copy.deepcopy(sd1_teacher)).train()
    assert [u.name for u in hybrid.units] == [
        "down_blocks.0+up_blocks.3",
        "down_blocks.1+up_blocks.2",
        "down_blocks.2+up_blocks.1",
        "down_blocks.3+up_blocks.0",
        "mid_block",
    ]
    for mask in range(2 ** len(hybrid.units)):
        set_units(hybrid, [mask >> i & 1 for i in range(len(hybrid.units))])
        with torch.no_grad():
            torch.testing.assert_close(hybrid(sample, timestep, context).sample, expected, rtol=0, atol=0)
    for probability in (0.0, 0.3, 0.7, 1.0):
        controller = TheseusController(hybrid.units, ReplacementSchedule(0.0, probability), seed=5)
        controller.step(11)
        with torch.no_grad():
            torch.testing.assert_close(hybrid(sample, timestep, context).sample, expected, rtol=0, atol=0)


def test_identical_copies_at_a_latent_size_that_is_not_a_multiple_of_8(sd1_teacher):
    sample, timestep, context = inputs(size=(20, 12), batch=1)
    with torch.no_grad():
        expected = sd1_teacher(sample, timestep, context).sample
        hybrid = TheseusUNet(sd1_teacher, copy.deepcopy(sd1_teacher)).train()
        set_units(hybrid, [1, 0, 1, 0, 1])
        torch.testing.assert_close(hybrid(sample, timestep, context).sample, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, mask",
    [
        ("bk_base", [0, 0, 0, 0, 0]),
        ("bk_base", [1, 1, 1, 1, 1]),
        ("bk_base", [1, 0, 1, 0, 1]),
        ("bk_base", [0, 1, 0, 1, 0]),
        ("bk_small", [0, 1, 1, 0, 1]),
        ("bk_small", [1, 0, 0, 1, 0]),
        ("bk_tiny", [0, 0, 0]),
        ("bk_tiny", [1, 1, 1]),
        ("bk_tiny", [1, 0, 0]),
        ("bk_tiny", [0, 1, 1]),
    ],
)
def test_mixed_hybrid_equals_the_diffusers_unet_with_those_stages(sd1_teacher, name, mask):
    student, _ = build_student(sd1_teacher, student_config(sd1_teacher.config, name))
    with torch.no_grad():  # make the student differ from the teacher it was copied from
        for parameter in student.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    hybrid = TheseusUNet(sd1_teacher, student).train()
    set_units(hybrid, mask)
    stages = {i for i, m in enumerate(mask[: len(student.down_blocks)]) if m}
    reference = reference_unet(sd1_teacher, student, stages, mid_from_student=len(mask) > 3 and bool(mask[4]))
    sample, timestep, context = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            hybrid(sample, timestep, context).sample, reference(sample, timestep, context).sample
        )


def test_units_of_each_student(sd1_teacher):
    names = {}
    for name in ("bk_base", "bk_small", "bk_tiny"):
        student, _ = build_student(sd1_teacher, student_config(sd1_teacher.config, name))
        names[name] = [u.name for u in TheseusUNet(sd1_teacher, student).units]
    assert names["bk_base"] == names["bk_small"] and names["bk_base"][-1] == "mid_block"
    assert names["bk_tiny"] == ["down_blocks.0+up_blocks.3", "down_blocks.1+up_blocks.2", "down_blocks.2+up_blocks.1"]


def test_eval_mode_runs_the_student_and_the_teacher_is_borrowed(sd1_teacher):
    student, _ = build_student(sd1_teacher, student_config(sd1_teacher.config, "bk_small"))
    hybrid = TheseusUNet(sd1_teacher, student)
    set_units(hybrid, [0] * 5)
    sample, timestep, context = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            hybrid.eval()(sample, timestep, context).sample, student(sample, timestep, context).sample
        )
    assert all(key.startswith("student.") for key in hybrid.state_dict())
    assert {id(p) for p in hybrid.parameters()} == {id(p) for p in student.parameters()}
    hybrid.train()
    assert student.training and not sd1_teacher.training


def test_gradients_reach_the_student_stages_in_use_through_teacher_stages(sd1_teacher):
    student, _ = build_student(sd1_teacher, student_config(sd1_teacher.config, "bk_base"))
    hybrid = TheseusUNet(sd1_teacher, student).train()
    set_units(hybrid, [0, 1, 0, 0, 0])  # student stage 1 sits inside teacher stage 0
    sample, timestep, context = inputs(batch=1)
    hybrid(sample, timestep, context).sample.square().mean().backward()
    assert student.down_blocks[1].resnets[0].conv1.weight.grad.abs().sum() > 0
    assert student.up_blocks[2].resnets[1].conv1.weight.grad.abs().sum() > 0
    assert student.conv_in.weight.grad.abs().sum() > 0  # stems are the student's
    assert student.down_blocks[0].resnets[0].conv1.weight.grad is None
    assert all(p.grad is None for p in sd1_teacher.parameters())


def test_student_features_are_recorded_only_for_stages_in_use(sd1_teacher):
    student, _ = build_student(sd1_teacher, student_config(sd1_teacher.config, "bk_tiny"))
    hybrid = TheseusUNet(sd1_teacher, student).train()
    hooks = FeatureHooks(student, [p.student for p in feature_pairs(student, sd1_teacher)])
    set_units(hybrid, [0, 1, 0])
    sample, timestep, context = inputs(batch=1)
    with torch.no_grad(), hooks.capture(require_all=False) as features:
        hybrid(sample, timestep, context)
    assert set(features) == {"down_blocks.1", "up_blocks.1"}
    hooks.remove()


def test_teacher_in_lower_precision(sd1_teacher):
    student, _ = build_student(sd1_teacher, student_config(sd1_teacher.config, "bk_base"))
    hybrid = TheseusUNet(sd1_teacher, student).train()
    set_units(hybrid, [1, 0, 1, 0, 0])
    sample, timestep, context = inputs(batch=1)
    with torch.no_grad():
        expected = hybrid(sample, timestep, context).sample
        low = TheseusUNet(copy.deepcopy(sd1_teacher).to(torch.bfloat16), student).train()
        set_units(low, [1, 0, 1, 0, 0])
        output = low(sample, timestep, context).sample
    assert output.dtype == torch.float32
    assert (output - expected).abs().mean() < 0.05 * expected.abs().mean()


def test_unsupported_unets_are_reported(sd1_teacher):
    config = plain_config(sd1_teacher.config) | {"class_embed_type": "timestep"}
    with pytest.raises(ConfigError, match="SD1.x/SD2.x UNets only .*class_embed_type"):
        TheseusUNet(UNet2DConditionModel(**config), UNet2DConditionModel(**config))
