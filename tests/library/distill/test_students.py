import json

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from library.distill.students import build_student, plain_config, preset_config, student_config
from library.errors import ConfigError
from library.models.sd_configs import SD15_UNET, SD21_UNET
from library.models.stable_diffusion import load_stable_diffusion, save_diffusers_folder

# Exact counts from distill.md §0/§1.4 (BK-SDM and Segmind publish the same figures).
SD15_COUNTS = {"teacher": 859_520_964, "bk_base": 579_384_964, "bk_small": 482_346_884, "bk_tiny": 323_384_964}
SD21_COUNTS = {"teacher": 865_910_724, "bk_base": 583_480_964, "bk_small": 485_787_524, "bk_tiny": 326_825_604}


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("config, counts", [(SD15_UNET, SD15_COUNTS), (SD21_UNET, SD21_COUNTS)], ids=["sd15", "sd21"])
def test_full_size_students_have_the_published_parameter_counts(config, counts):
    with init_empty_weights():
        teacher = UNet2DConditionModel(**config)
    assert count(teacher) == counts["teacher"]
    for name in ("bk_base", "bk_small", "bk_tiny"):
        student, _ = build_student(teacher, student_config(teacher.config, name))
        assert count(student) == counts[name], name


def test_presets_change_only_the_published_keys():
    with init_empty_weights():
        teacher = UNet2DConditionModel(**SD21_UNET)
    base = preset_config(teacher.config, "bk_base")
    small = preset_config(teacher.config, "bk_small")
    tiny = preset_config(teacher.config, "bk_tiny")
    original = plain_config(teacher.config)
    assert {k for k in base if base[k] != original[k]} == {"layers_per_block"}
    assert {k for k in small if small[k] != original[k]} == {"layers_per_block", "mid_block_type"}
    assert small["mid_block_type"] is None
    # distill.md §1.5: Tiny drops the innermost stage everywhere a per-stage list says so.
    assert tiny["block_out_channels"] == [320, 640, 1280]
    assert tiny["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    assert tiny["up_block_types"] == ["CrossAttnUpBlock2D"] * 3
    assert tiny["attention_head_dim"] == [5, 10, 20]
    assert tiny["cross_attention_dim"] == 1024 and tiny["use_linear_projection"] is True


@pytest.mark.parametrize("name", ["bk_base", "bk_small", "bk_tiny"])
def test_student_config_rebuilds_the_student(sd1_teacher, name):
    student, _ = build_student(sd1_teacher, student_config(sd1_teacher.config, name))
    rebuilt = UNet2DConditionModel.from_config(student.config)
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_custom_json_overrides_the_preset_or_teacher(sd1_teacher, tmp_path):
    path = tmp_path / "student.json"
    path.write_text(json.dumps({"layers_per_block": [1, 2, 1, 2], "_class_name": "UNet2DConditionModel"}))
    config = student_config(sd1_teacher.config, student_config_file=path)
    assert config["layers_per_block"] == [1, 2, 1, 2]
    assert config["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert student_config(sd1_teacher.config, "bk_small", path)["mid_block_type"] is None
    student, report = build_student(sd1_teacher, config)
    assert [len(b.resnets) for b in student.up_blocks] == [3, 2, 3, 2]
    assert set(report.copied) == set(student.state_dict())


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(student="bk_huge"), "--student 'bk_huge' is unknown"),
        (dict(), "pass --student"),
    ],
)
def test_bad_student_names_are_reported(sd1_teacher, arguments, message):
    with pytest.raises(ConfigError, match=message):
        student_config(sd1_teacher.config, **arguments)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid json"),
        ("[1, 2]", "must hold a json object"),
        ('{"layers_per_blocks": 1}', "'layers_per_blocks' is not a UNet2DConditionModel argument"),
    ],
)
def test_bad_student_config_files_are_reported(sd1_teacher, tmp_path, content, message):
    path = tmp_path / "student.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"--student_config .*{message}"):
        student_config(sd1_teacher.config, student_config_file=path)


def test_missing_student_config_file_is_reported(sd1_teacher, tmp_path):
    with pytest.raises(ConfigError, match="--student_config .*cannot be read"):
        student_config(sd1_teacher.config, student_config_file=tmp_path / "absent.json")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"layers_per_block": 3}, "has 3 layers but teacher"),
        ({"block_out_channels": [32, 64, 64, 32]}, "cannot come from teacher"),
        ({"cross_attention_dim": 32}, "cannot come from teacher"),
        ({"down_block_types": ["CrossAttnDownBlock2D"] * 4}, "has no teacher counterpart"),
        ({"layers_per_block": [1, 1]}, "not a valid UNet2DConditionModel"),
    ],
)
def test_students_the_teacher_cannot_initialise_are_reported(sd1_teacher, tmp_path, overrides, message):
    path = tmp_path / "student.json"
    path.write_text(json.dumps(overrides))
    with pytest.raises(ConfigError, match=message):
        build_student(sd1_teacher, student_config(sd1_teacher.config, student_config_file=path))


@pytest.mark.parametrize("v2, name", [(False, "bk_base"), (False, "bk_small"), (False, "bk_tiny"), (True, "bk_tiny")])
def test_saved_student_loads_in_a_diffusers_pipeline(tiny_sd, tmp_path, v2, name):
    model = load_stable_diffusion(tiny_sd.sd2_dir if v2 else tiny_sd.sd1_dir)
    model.unet, _ = build_student(model.unet, student_config(model.unet.config, name))
    save_diffusers_folder(model, tmp_path / "student")

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "student", local_files_only=True)
    assert pipe.unet.config.block_out_channels == model.unet.config.block_out_channels
    assert pipe.unet.config.mid_block_type == model.unet.config.mid_block_type
    for key, tensor in model.unet.state_dict().items():
        torch.testing.assert_close(pipe.unet.state_dict()[key], tensor, rtol=0, atol=0)
    image = pipe(
        "a photo of sks toy",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
