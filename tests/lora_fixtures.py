"""Fixtures: random kohya LoRA/LoCon files shaped for the tiny SD1 and SD2 models."""

import pytest
from safetensors.torch import save_file

from library.models.stable_diffusion import load_stable_diffusion
from library.synthetic_lora import kohya_lora_targets, random_lora


@pytest.fixture(scope="session")
def tiny_targets(tiny_sd):
    """kohya's LoCon targets of the tiny SD1 and SD2 models (from their diffusers folders)."""
    targets = {}
    for name, folder in (("sd1", tiny_sd.sd1_dir), ("sd2", tiny_sd.sd2_dir)):
        model = load_stable_diffusion(folder)
        targets[name] = kohya_lora_targets(model.unet, model.text_encoder, conv=True)
    return targets


@pytest.fixture
def write_lora(tmp_path):
    """``write_lora(targets, name, dim, alpha, ...)`` -> path of a random LoRA file."""

    def write(targets, name, dim=4, alpha=2.0, conv_dim=3, conv_alpha=1.5, seed=0, metadata=None, dtype=None):
        import torch

        tensors = random_lora(targets, dim, alpha, conv_dim, conv_alpha, seed=seed, dtype=dtype or torch.float32)
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path, metadata=metadata)
        return path

    return write
