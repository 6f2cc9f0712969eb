"""Models the network tests share: full-size shapes on the meta device, and the tiny SD1/SD2 models."""

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.models.sd_configs import CLIP_L_TEXT, OPEN_CLIP_H_TEXT, SD15_UNET, SD21_UNET
from library.models.stable_diffusion import load_stable_diffusion
from tests.lora_fixtures import tiny_targets, write_lora  # noqa: F401  (the LoRA toolbox's files)


@pytest.fixture(scope="module")
def full_size():
    """SD1.5- and SD2.1-shaped text encoders and UNets on the meta device: names and shapes, no memory."""
    with init_empty_weights():
        return {
            "sd15": (CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), UNet2DConditionModel(**SD15_UNET)),
            "sd21": (CLIPTextModel(CLIPTextConfig(**OPEN_CLIP_H_TEXT)), UNet2DConditionModel(**SD21_UNET)),
        }


@pytest.fixture(scope="module")
def pipelines(tiny_sd):
    """The tiny folders as diffusers loads them, UNet in float64 (see TOLERANCES; CLIP does not run in float64)."""
    loaded = {}
    for name in ("sd1", "sd2"):
        loaded[name] = StableDiffusionPipeline.from_pretrained(getattr(tiny_sd, f"{name}_dir"), local_files_only=True)
        loaded[name].unet.to(torch.float64)
    return loaded


@pytest.fixture(scope="module")
def sd1(tiny_sd):
    return load_stable_diffusion(tiny_sd.sd1_dir)


@pytest.fixture(scope="module")
def sd2(tiny_sd):
    return load_stable_diffusion(tiny_sd.sd2_dir)
