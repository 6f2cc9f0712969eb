"""Segmind's SDXL students (SSD-1B, Vega) built from an SDXL teacher's config."""

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.distill.features import feature_pairs
from library.distill.students import build_student, student_config
from library.errors import ConfigError
from library.models import ldm_conversion as conv
from library.models import sgm_conversion as sgm
from library.models.sd_configs import CLIP_L_TEXT, OPEN_CLIP_BIGG_TEXT, SD15_UNET, SD_VAE, SDXL_UNET
from library.models.sdxl import load_sdxl

# Parameters of the released UNets segmind/SSD-1B and segmind/Segmind-Vega, as diffusers builds them
# from their unet/config.json: the layer depths of those configs (also in ComfyUI's detection tables for
# the released files, COMFYUI_DEPTHS below) on SDXL base's channels. The paper (arXiv 2401.02677) rounds
# them to 1.3B and 0.74B; Segmind's Vega write-up splits Vega into 247M down / 31M mid / 460M up blocks,
# which these counts reproduce (246.8M / 31.1M / 459.9M). SDXL base 1.0's UNet has 2,567,463,684.
PUBLISHED = {"sdxl": 2_567_463_684, "ssd_1b": 1_331_334_404, "vega": 745_225_604}

# Transformer layers per attention block of the released configs (written out here, not taken
# from the code under test): down stages 1, 2 and up blocks 0, 1; the mid block is one resnet.
RELEASED_DEPTHS = {
    "ssd_1b": ([[2, 2], [4, 4]], [[4, 4, 10], [2, 1, 1]]),
    "vega": ([[1, 1], [2, 2]], [[2, 2, 2], [1, 1, 1]]),
}


def count(module):
    return sum(p.numel() for p in module.parameters())


def depths(unet):
    down = [[len(a.transformer_blocks) for a in unet.down_blocks[i].attentions] for i in (1, 2)]
    up = [[len(a.transformer_blocks) for a in unet.up_blocks[i].attentions] for i in (0, 1)]
    return down, up


@pytest.fixture(scope="module")
def sdxl_meta():
    with init_empty_weights():
        return UNet2DConditionModel(**SDXL_UNET)


@pytest.mark.parametrize("name", ["ssd_1b", "vega"])
def test_full_size_students_have_the_released_parameter_counts(sdxl_meta, name):
    assert count(sdxl_meta) == PUBLISHED["sdxl"]
    student, _ = build_student(sdxl_meta, student_config(sdxl_meta.config, name))  # meta: no memory
    assert count(student) == PUBLISHED[name]
    assert depths(student) == tuple(RELEASED_DEPTHS[name])
    assert len(student.mid_block.resnets) == 1 and not getattr(student.mid_block, "attentions", None)
    assert [len(b.resnets) for b in student.down_blocks] == [2, 2, 2]  # resnets and channels stay
    assert list(student.config.block_out_channels) == list(sdxl_meta.config.block_out_channels)


@pytest.fixture(scope="module")
def tiny_teacher(tiny_sd):
    return load_sdxl(tiny_sd.sdxl_dir).unet


@pytest.mark.parametrize("name", ["ssd_1b", "vega"])
def test_tiny_student_keeps_the_first_layers_and_pairs_the_kept_blocks(tiny_teacher, name):
    student, report = build_student(tiny_teacher, student_config(tiny_teacher.config, name))
    # The tiny teacher's depths are 1 (stage 1) and 2 (stage 2): the same fraction, at least one layer.
    assert depths(tiny_teacher) == ([[1, 1], [2, 2]], [[2, 2, 2], [1, 1, 1]])
    expected = {
        "ssd_1b": ([[1, 1], [1, 1]], [[1, 1, 2], [1, 1, 1]]),
        "vega": ([[1, 1], [1, 1]], [[1, 1, 1], [1, 1, 1]]),
    }
    assert depths(student) == expected[name]
    teacher_state = tiny_teacher.state_dict()
    for key, value in student.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key  # kept layers are the teacher's, same names
    dropped = {k.split(".transformer_blocks.")[0] for k in report.unused_teacher_keys if "transformer_blocks.1." in k}
    assert "down_blocks.2.attentions.0" in dropped
    names = [(p.student, p.teacher) for p in feature_pairs(student, tiny_teacher)]
    blocks = [
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2",
    ]
    assert names == [(b, b) for b in blocks]
    rebuilt = UNet2DConditionModel.from_config(student.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in student.state_dict().items()
    }


def test_students_of_the_other_family_are_refused(sdxl_meta):
    with pytest.raises(ConfigError, match=r"--student ssd_1b is Segmind's SDXL student; the teacher is not"):
        student_config(SD15_UNET, "ssd_1b")
    with pytest.raises(
        ConfigError, match=r"--student bk_small is a BK-SDM student of SD1.x/SD2.x; the teacher is SDXL"
    ):
        student_config(sdxl_meta.config, "bk_small")


# ComfyUI's checkpoint detection tables for the released single files (comfy/model_detection.py):
# transformer layers per input block (levels 0-2, two blocks each) and per output block, listed
# from the outermost output block inwards; a middle block of one resnet.
COMFYUI_DEPTHS = {
    "ssd_1b": ([0, 0, 2, 2, 4, 4], [0, 0, 0, 1, 1, 2, 10, 4, 4]),
    "vega": ([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2]),
}


@pytest.mark.parametrize("name", ["ssd_1b", "vega"])
def test_full_size_students_as_sgm_files_have_comfyuis_layout_and_read_back(sdxl_meta, name):

    student, _ = build_student(sdxl_meta, student_config(sdxl_meta.config, name))
    with init_empty_weights():
        vae = AutoencoderKL(**SD_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIGG_TEXT))
    state = sgm.unet_to_sgm(student.state_dict(), student.config)
    state.update(conv.vae_to_ldm(vae.state_dict(), vae.config))
    state.update(sgm.text_encoder_1_to_sgm(te1.state_dict()))
    state.update(sgm.text_encoder_2_to_sgm(te2.state_dict()))

    def depth(block: str, index: int) -> int:
        prefix = f"model.diffusion_model.{block}.{index}.1.transformer_blocks."
        return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})

    input_depths = [depth("input_blocks", i) for i in (1, 2, 4, 5, 7, 8)]
    output_depths = [depth("output_blocks", i) for i in range(9)][::-1]
    assert (input_depths, output_depths) == COMFYUI_DEPTHS[name]
    assert {k.split(".")[3] for k in state if k.startswith("model.diffusion_model.middle_block.")} == {"0"}

    arch, te2_config = sgm.infer_sdxl_architecture(state)
    config = sgm.unet_config_from_sgm(arch, state, te2_config["projection_dim"])
    with init_empty_weights():
        read_back = UNet2DConditionModel.from_config(config)
    assert count(read_back) == PUBLISHED[name]
    assert set(sgm.convert_unet_from_sgm(state, config)) == set(student.state_dict())
