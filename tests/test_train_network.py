"""train_network.py end to end on the tiny fixtures: training, saving, resuming, errors."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image

import train_network
from library.models import load_stable_diffusion
from library.noise import NoiseOptions, make_noise, noisy_latents, prediction_target, sample_timesteps
from library.text import encode_tokens, tokenize_captions
from networks import lora
from networks.lora_file import load_lora_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def data(tiny_sd, tmp_path):
    """A private copy of the tiny dataset (latent caches are written next to images)."""
    shutil.copytree(tiny_sd.train_data_dir, tmp_path / "img")
    shutil.copytree(tiny_sd.reg_data_dir, tmp_path / "reg")
    return tmp_path


def base_argv(tiny_sd, data: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny_sd.sd1_dir),
        "--train_data_dir", str(data / "img"),
        "--output_dir", str(data / "out"),
        "--output_name", "tiny",
        "--resolution", "64",
        "--caption_extension", ".txt",
        "--network_module", "networks.lora",
        "--network_dim", "4",
        "--network_alpha", "4",
        "--learning_rate", "1e-3",
        "--optimizer_type", "AdamW",
        "--max_train_steps", "4",
        "--seed", "7",
        "--max_data_loader_n_workers", "0",
        *extra,
    ]  # fmt: skip


def _image_tensor(path: Path) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((64, 64))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1


def fixed_batch_loss(model_dir: Path, image_dir: Path, lora_path: Path | None = None, seed: int = 123) -> float:
    """Loss on fixed images, captions, noise and timesteps, with or without a trained LoRA."""
    model = load_stable_diffusion(model_dir)
    pngs = sorted(image_dir.glob("*.png"))[:4]
    images = torch.stack([_image_tensor(p) for p in pngs])
    captions = [p.with_suffix(".txt").read_text().strip() for p in pngs]
    if lora_path is not None:
        network, weights = lora.create_network_from_weights(
            1.0, str(lora_path), model.vae, model.text_encoder, model.unet
        )
        network.apply_to(model.text_encoder, model.unet)
        network.load_state_dict(weights, strict=True)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        latents = model.vae.encode(images).latent_dist.sample() * model.vae.config.scaling_factor
        hidden = encode_tokens(model.text_encoder, tokenize_captions(model.tokenizer, captions))
        options = NoiseOptions()
        noise = make_noise(latents, options)
        timesteps = sample_timesteps(latents.shape[0], options, latents.device)
        noisy = noisy_latents(model.noise_scheduler, latents, noise, timesteps, options)
        prediction = model.unet(noisy, timesteps, hidden).sample
        target = prediction_target(model.noise_scheduler, latents, noise, timesteps)
        return torch.nn.functional.mse_loss(prediction, target).item()


@pytest.mark.parametrize(
    ("network_args", "precision"),
    [([], "no"), (["--network_args", "conv_dim=4", "conv_alpha=4"], "no"), (["--network_args", "conv_dim=4"], "bf16")],
    ids=["lora-fp32", "locon-fp32", "locon-bf16"],
)
def test_training_lowers_the_loss_on_fixed_batches(tiny_sd, data, network_args, precision):
    train_network.main(
        base_argv(tiny_sd, data, "--max_train_steps", "30", "--mixed_precision", precision, *network_args)
    )
    saved = data / "out" / "tiny.safetensors"
    images = data / "img" / "10_sks toy"
    before = fixed_batch_loss(tiny_sd.sd1_dir, images)
    after = fixed_batch_loss(tiny_sd.sd1_dir, images, saved)
    assert after < before * 0.98, (before, after)
    tensors, metadata = load_lora_file(saved)
    if network_args:
        assert any("resnets" in k for k in tensors)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_steps"] == "30" and metadata["ss_mixed_precision"] == precision
