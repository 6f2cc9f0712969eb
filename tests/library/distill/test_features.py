import pytest
import torch

from library.distill.features import FeatureHooks, FeaturePair, feature_pairs
from library.distill.students import build_student, student_config
from library.distill.teacher import FrozenTeacher
from library.models.stable_diffusion import load_stable_diffusion

LATENT = 16  # tiny fixture: channels (32, 64, 64, 64), three downsamplers


def inputs(batch=2):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, LATENT, LATENT, generator=generator)
    context = torch.randn(batch, 77, 64, generator=generator)
    return sample, torch.tensor([10, 700][:batch]), context


def expected_shape(name, channels, batch=2):
    """Block output shapes of a diffusers UNet, from its stage channels (independent of the hooks)."""
    kind, index = name.split(".")[0], int(name.split(".")[1]) if "." in name else None
    stages = len(channels)
    if kind == "down_blocks":
        size = LATENT // 2 ** min(index + 1, stages - 1)
        return (batch, channels[index], size, size)
    if kind == "mid_block":
        return (batch, channels[-1], LATENT // 2 ** (stages - 1), LATENT // 2 ** (stages - 1))
    stage = stages - 1 - index
    size = LATENT // 2 ** max(stage - 1, 0)
    return (batch, channels[stage], size, size)


PAIRS = {
    # distill.md §2.2: Segmind's 9 terms for Base, BK-SDM's 8 for Small, Segmind's Tiny alignment.
    "bk_base": [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(4)]
    + [("mid_block", "mid_block")]
    + [(f"up_blocks.{i}", f"up_blocks.{i}") for i in range(4)],
    "bk_small": [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(4)]
    + [(f"up_blocks.{i}", f"up_blocks.{i}") for i in range(4)],
    "bk_tiny": [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(2)]
    + [("down_blocks.2", "up_blocks.0")]
    + [(f"up_blocks.{i}", f"up_blocks.{i + 1}") for i in range(3)],
}


@pytest.mark.parametrize("name", ["bk_base", "bk_small", "bk_tiny"])
def test_pairs_match_the_published_alignments(sd1_teacher, name):
    student, _ = build_student(sd1_teacher, student_config(sd1_teacher.config, name))
    assert feature_pairs(student, sd1_teacher) == [FeaturePair(s, t) for s, t in PAIRS[name]]


@pytest.mark.parametrize("name", ["bk_base", "bk_small", "bk_tiny"])
def test_hooked_features_have_the_block_output_shapes(sd1_teacher, name):
    student, _ = build_student(sd1_teacher, student_config(sd1_teacher.config, name))
    pairs = feature_pairs(student, sd1_teacher)
    teacher = FrozenTeacher(sd1_teacher, [p.teacher for p in pairs])
    hooks = FeatureHooks(student, [p.student for p in pairs])
    sample, timestep, context = inputs()
    targets = teacher(sample, timestep, context)
    with hooks.capture() as features:
        student(sample, timestep, context)
    student_channels, teacher_channels = student.config.block_out_channels, sd1_teacher.config.block_out_channels
    for pair in pairs:
        assert features[pair.student].shape == expected_shape(pair.student, student_channels), pair
        assert targets.features[pair.teacher].shape == expected_shape(pair.teacher, teacher_channels), pair
        assert features[pair.student].requires_grad
    hooks.remove()
    teacher.hooks.remove()


def test_hooks_record_only_inside_capture_into_a_fresh_dict(sd1_teacher):
    hooks_before = len(sd1_teacher.up_blocks[2]._forward_hooks)
    hooks = FeatureHooks(sd1_teacher, ["down_blocks.1", "up_blocks.2"])
    sample, timestep, context = inputs(batch=1)
    with torch.no_grad(), hooks.capture() as first:
        reference = sd1_teacher(sample, timestep, context).sample
    with torch.no_grad():
        sd1_teacher(sample * 2, timestep, context)  # outside capture: records nothing
    assert set(first) == {"down_blocks.1", "up_blocks.2"}
    with torch.no_grad(), hooks.capture() as second:
        again = sd1_teacher(sample, timestep, context).sample
    assert second is not first
    torch.testing.assert_close(second["up_blocks.2"], first["up_blocks.2"], rtol=0, atol=0)
    torch.testing.assert_close(again, reference, rtol=0, atol=0)
    hooks.remove()
    assert len(sd1_teacher.up_blocks[2]._forward_hooks) == hooks_before


def test_capture_reports_hooked_modules_that_did_not_run(sd1_teacher):
    hooks = FeatureHooks(sd1_teacher, ["mid_block"])
    with pytest.raises(RuntimeError, match="did not run during the forward: mid_block"), hooks.capture():
        pass
    with hooks.capture(require_all=False) as features:
        pass
    assert features == {}
    hooks.remove()


def test_frozen_teacher_gives_float32_targets_without_gradients(sd1_teacher):
    sample, timestep, context = inputs()
    sample.requires_grad_(True)
    with torch.no_grad():
        reference = sd1_teacher(sample, timestep, context).sample
    teacher = FrozenTeacher(sd1_teacher, ["down_blocks.0"])
    output = teacher(sample, timestep, context)
    assert not teacher.unet.training
    assert not any(p.requires_grad for p in teacher.unet.parameters())
    assert output.prediction.grad_fn is None and output.features["down_blocks.0"].grad_fn is None
    torch.testing.assert_close(output.prediction, reference, rtol=0, atol=0)
    teacher.hooks.remove()


def test_frozen_teacher_in_bfloat16(sd1_teacher, tiny_sd):
    unet = load_stable_diffusion(tiny_sd.sd1_dir).unet
    teacher = FrozenTeacher(unet, dtype=torch.bfloat16)
    sample, timestep, context = inputs()
    with torch.no_grad():
        reference = sd1_teacher(sample, timestep, context).sample
    output = teacher(sample, timestep, context)
    assert teacher.dtype == torch.bfloat16 and output.prediction.dtype == torch.float32
    assert (output.prediction - reference).abs().mean() < 0.05 * reference.abs().mean()
