"""A tiny SDXL-shaped model, made locally and deterministically from a seed.

It has SDXL's structure with small widths: a 3-level UNet without attention in the first level,
transformer depth per level, linear projections, 64-channel heads, the ``text_time`` embedding of
pooled text and six size/crop numbers; a CLIP-L-like ``CLIPTextModel`` and a bigG-like
``CLIPTextModelWithProjection`` (gelu, projection); both tokenizers (the second pads with ``!``);
an SDXL-scaled VAE. Tests and the quickstart run the SDXL loading, training and export code on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.models.families import make_training_scheduler
from library.models.ldm_architecture import CLIP_HEAD_CHANNELS
from library.models.sdxl import SDXL, SDXLModel, save_sdxl_diffusers_folder, save_sgm_checkpoint
from library.models.sgm_conversion import SDXL_VAE_SCALE_FACTOR
from library.tiny_parts import roughen, tiny_vae_config, write_tiny_tokenizer

TE1_WIDTH, TE2_WIDTH = 64, 128  # SDXL: 768 (CLIP-L) and 1280 (bigG); the UNet's context is their concatenation
ADDITION_TIME_EMBED_DIM = 8  # SDXL: 256 per size/crop number


def tiny_sdxl_unet_config() -> dict:
    """SDXL's UNet block structure (SDXL: 320/640/1280 channels, depths 0/2/10) with small widths."""
    return dict(
        sample_size=8,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(1, 2, 2),  # heads per level: 64 channels per head, as SDXL
        use_linear_projection=True,
        cross_attention_dim=TE1_WIDTH + TE2_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TE2_WIDTH + 6 * ADDITION_TIME_EMBED_DIM,
        upcast_attention=False,
    )


def _text_config(width: int, act: str, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=3,
        num_attention_heads=width // CLIP_HEAD_CHANNELS,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sdxl(tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer, seed: int = 0) -> SDXLModel:
    """The tiny SDXL model (epsilon prediction), deterministic from ``seed``."""
    generator = torch.Generator().manual_seed(seed + 2000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2000)
        unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
        vae = AutoencoderKL(**{**tiny_vae_config(), "scaling_factor": SDXL_VAE_SCALE_FACTOR})
        te1 = CLIPTextModel(_text_config(TE1_WIDTH, "quick_gelu", tokenizer))
        te2 = CLIPTextModelWithProjection(_text_config(TE2_WIDTH, "gelu", tokenizer_2))
    for module in (unet, vae, te1, te2):
        roughen(module, generator)
        module.requires_grad_(False).eval()
    return SDXLModel(te1, te2, vae, unet, tokenizer, tokenizer_2, make_training_scheduler(False), "tiny")


def write_tiny_sdxl(out: str | os.PathLike, tokenizer_cache_dir: str | os.PathLike, seed: int = 0) -> SDXLModel:
    """``out/sdxl/`` (diffusers) and ``out/sdxl.safetensors`` (SGM); tokenizers in kohya's cache layout."""
    out, cache = Path(out), Path(tokenizer_cache_dir)
    tokenizer = write_tiny_tokenizer(cache / SDXL.tokenizer_folder, v2=False)
    tokenizer_2 = write_tiny_tokenizer(cache / SDXL.tokenizer_2_folder, v2=True)  # pads with "!", id 0
    model = build_tiny_sdxl(tokenizer, tokenizer_2, seed)
    save_sdxl_diffusers_folder(model, out / "sdxl")
    save_sgm_checkpoint(model, out / "sdxl.safetensors")
    return model
