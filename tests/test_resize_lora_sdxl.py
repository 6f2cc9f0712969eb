"""resize_lora.py on SDXL LoRA/LoCon files: kohya's SDXL keys kept, ranks cut exactly, SDXL metadata carried."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from library.models.sdxl import load_sdxl
from networks import lora
from networks.lora_file import load_lora_file
from tests.kohya_reference import dense_delta, dense_truncation
from tests.networks.helpers import perturb
from tests.test_resize_lora_cli import run

SDXL_METADATA = {
    "ss_base_model_version": "sdxl_base_v1-0",
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
    "ss_network_module": "networks.lora",
}


@pytest.fixture(scope="module")
def sdxl_locon(tiny_sd, tmp_path_factory):
    model = load_sdxl(tiny_sd.sdxl_dir)
    network = perturb(
        lora.create_network(1.0, 8, 4, None, model.text_encoders, model.unet, conv_dim="4", conv_alpha="2")
    )
    path = tmp_path_factory.mktemp("sdxl_lora") / "sdxl_locon.safetensors"
    network.save_weights(path, None, SDXL_METADATA)
    return path


def test_sdxl_locon_resizes_with_its_keys_and_metadata(tiny_sd, sdxl_locon, tmp_path):
    out = tmp_path / "small.safetensors"
    assert run("--model", sdxl_locon, "--save_to", out, "--new_rank", 3, "--new_conv_rank", 2) == 0
    original, _ = load_lora_file(sdxl_locon)
    resized, metadata = load_lora_file(out)
    assert set(resized) == set(original)
    names = {key.partition(".")[0] for key in resized}
    assert any(n.startswith("lora_te2_") for n in names) and "lora_unet_input_blocks_1_0_in_layers_2" in names
    for name in names:
        down, up = original[f"{name}.lora_down.weight"], original[f"{name}.lora_up.weight"]
        rank = 2 if down.dim() == 4 else 3  # kohya: every conv (1x1 too) takes --new_conv_rank
        new_down, new_up = resized[f"{name}.lora_down.weight"], resized[f"{name}.lora_up.weight"]
        assert new_down.shape[0] == rank, name
        scale = resized[f"{name}.alpha"].item() / rank / (original[f"{name}.alpha"].item() / down.shape[0])
        torch.testing.assert_close(
            dense_delta(new_up, new_down) * scale, dense_truncation(up, down, rank), rtol=1e-4, atol=1e-5
        )
    for key, value in SDXL_METADATA.items():
        assert metadata[key] == value, key
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sd.sdxl_dir, local_files_only=True)
    pipeline.load_lora_weights(str(out.parent), weight_name=out.name)  # every SDXL key still maps
