"""The toy text-to-image model: SD1's layout at toy size, so every loader, network and key applies.

64 px images, a VAE with SD's four levels (stride 8, so 8x8x4 latents, as the latent caches and
bucket checks expect), a CLIP text encoder over the toy vocabulary, and a UNet with SD1.5's blocks
(CrossAttnDownBlock2D x3 + DownBlock2D, two layers per block, transformer blocks with GEGLU
feed-forwards, eight heads), so kohya's ``lora_unet_*``/``lora_te_*`` names, the block maps of the
distillation students and the FFN narrowing all address it as they address SD1.5.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from library.models.families import SD1, make_training_scheduler
from library.models.stable_diffusion import StableDiffusionModel
from library.tiny_parts import tiny_vae_config, write_tiny_tokenizer
from library.tiny_sd import TEXT_WIDTH, tiny_text_config
from library.toy_world.generator import COLOURS, SHAPES, SIZE

TOY_WORDS = ("a", "sks", "toy", "shape", *COLOURS, *SHAPES)
LATENT_SIZE = SIZE // 8
# With 32 channels at full resolution each GroupNorm group holds one channel, which normalises away
# a channel's image-wide level: on two-colour images the decoder then learns shapes long before
# colours (docs/quality.md). 64 channels give two per group and keep colour in their ratio.
VAE_CHANNELS = (64, 64, 64, 64)
# kohya's --noise_offset of the committed model's diffusion rounds, and so of fine-tuning it. SD's
# schedule leaves 0.07 of the signal at t=999; over an 8x8 latent its mean (the image's colour) is
# readable through the noise, so without an offset the model takes colour from the starting noise
# instead of the prompt (docs/quality.md).
PRETRAINING_NOISE_OFFSET = 0.5


def toy_unet_config() -> dict:
    return dict(
        sample_size=LATENT_SIZE,
        block_out_channels=(32, 64, 128, 128),  # SD1.5's 1:2:4:4, so the same layers have shortcuts
        attention_head_dim=8,  # SD1's eight heads (diffusers' legacy name for the head count)
        cross_attention_dim=TEXT_WIDTH,
        layers_per_block=2,
    )


def toy_vae_config(channels: tuple[int, ...] = VAE_CHANNELS) -> dict:
    """The tiny fixtures' VAE layout with ``channels`` per level (multiples of 32: SD's VAE norms
    use 32 groups, and single-file loaders assume it)."""
    return {**tiny_vae_config(), "block_out_channels": tuple(channels)}


def toy_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """The tiny fixtures' SD1 text encoder (width 64, one head, three layers) over the toy vocabulary."""
    return tiny_text_config(
        False, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )


def write_toy_tokenizer(out_dir: str | os.PathLike) -> CLIPTokenizer:
    """SD1's CLIP tokenizer format with every toy word a single token."""
    return write_tiny_tokenizer(out_dir, v2=False, words=TOY_WORDS)


def tokenizer_cache_folder(root: str | os.PathLike) -> Path:
    """Where kohya's ``--tokenizer_cache_dir root`` looks for an SD1 tokenizer."""
    return Path(root) / SD1.tokenizer_folder


def build_toy_model(
    tokenizer: CLIPTokenizer, seed: int, vae_channels: tuple[int, ...] = VAE_CHANNELS
) -> StableDiffusionModel:
    """The untrained toy model (diffusers' default initialisation), deterministic from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**toy_vae_config(vae_channels))
        text_encoder = CLIPTextModel(toy_text_config(tokenizer))
        unet = UNet2DConditionModel(**toy_unet_config())
    scheduler = make_training_scheduler(v_parameterization=False)
    return StableDiffusionModel(text_encoder, vae, unet, tokenizer, scheduler, False, False, "toy world")


@torch.no_grad()
def rescale_latents(vae: AutoencoderKL, factor: float) -> None:
    """Make the VAE's latents ``factor`` times larger without changing what it decodes.

    SD's loaders fix the latent scaling factor at 0.18215 (single files carry no such field), so
    instead of changing the factor, the latent space itself is rescaled until scaled latents have
    unit variance, as the noise schedule assumes: the encoder's mean rows are multiplied by
    ``factor`` (its log-variance rows shifted by ``2 log factor``), and the decoder's first
    convolution divides its input by ``factor``.
    """
    channels = vae.config.latent_channels
    quant = vae.quant_conv
    quant.weight[:channels] *= factor
    quant.bias[:channels] *= factor
    quant.bias[channels:] += 2.0 * float(torch.log(torch.tensor(factor)))
    vae.post_quant_conv.weight /= factor
