"""Tiny SD-shaped models and datasets, made locally and deterministically from a seed.

They have the block structure of SD1.5 (CrossAttnDownBlock2D x3 + DownBlock2D, transformer blocks
with GEGLU feed-forwards, a CLIP text encoder) and of SD2 (linear projections, 64-channel heads,
OpenCLIP text encoder, v-prediction), with small channel counts, so every test and the quickstart
run the same loading, training and export code that real checkpoints use, in seconds on a CPU.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from library.models.families import family_of, make_training_scheduler
from library.models.ldm_architecture import CLIP_HEAD_CHANNELS, VAE_SCALE_FACTOR
from library.models.stable_diffusion import StableDiffusionModel, save_diffusers_folder, save_ldm_checkpoint
from library.tiny_parts import roughen, tiny_vae_config, write_tiny_tokenizer
from library.tiny_sdxl import write_tiny_sdxl

TEXT_WIDTH = 64
COLORS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40)}
SHAPES = ("cube", "ball")


def tiny_unet_config(v2: bool) -> dict:
    """SD1.5/SD2.1 UNet block structure with small channels."""
    if v2:
        # 64 channels per head, as in SD2; heads per stage in diffusers' legacy attention_head_dim.
        return dict(
            sample_size=8,
            block_out_channels=(64, 128, 128, 128),
            attention_head_dim=[1, 2, 2, 2],
            use_linear_projection=True,
            cross_attention_dim=TEXT_WIDTH,
            layers_per_block=2,
            upcast_attention=True,
        )
    return dict(
        sample_size=8,
        block_out_channels=(32, 64, 64, 64),
        attention_head_dim=8,
        cross_attention_dim=TEXT_WIDTH,
        layers_per_block=2,
    )


def tiny_text_config(v2: bool, vocab_size: int, bos: int, eos: int, pad: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=TEXT_WIDTH // CLIP_HEAD_CHANNELS,
        max_position_embeddings=77,
        hidden_act="gelu" if v2 else "quick_gelu",
        projection_dim=TEXT_WIDTH,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def build_tiny_model(v2: bool, tokenizer: CLIPTokenizer, seed: int = 0) -> StableDiffusionModel:
    """The tiny SD1 (epsilon) or SD2 (v-prediction) model, deterministic from ``seed``."""
    generator = torch.Generator().manual_seed(seed + (1000 if v2 else 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + (1000 if v2 else 0))
        unet = UNet2DConditionModel(**tiny_unet_config(v2))
        vae = AutoencoderKL(**tiny_vae_config())
        text_encoder = CLIPTextModel(
            tiny_text_config(
                v2, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
            )
        )
    for module in (unet, vae, text_encoder):
        roughen(module, generator)
        module.requires_grad_(False).eval()
    return StableDiffusionModel(
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        tokenizer=tokenizer,
        noise_scheduler=make_training_scheduler(v_parameterization=v2),
        v2=v2,
        v_parameterization=v2,
        source="tiny",
    )


def _tiny_ldm_yaml(model: StableDiffusionModel) -> dict:
    """The LDM ``v2-inference-v.yaml`` equivalent of the tiny SD2 model (A1111's yaml-beside-file)."""
    unet, vae = model.unet.config, model.vae.config
    heads_channels = unet.block_out_channels[0] // unet.attention_head_dim[0]
    return {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "parameterization": "v" if model.v_parameterization else "eps",
                "scale_factor": VAE_SCALE_FACTOR,
                "unet_config": {
                    "params": {
                        "image_size": unet.sample_size,
                        "in_channels": unet.in_channels,
                        "out_channels": unet.out_channels,
                        "model_channels": unet.block_out_channels[0],
                        "attention_resolutions": [1, 2, 4],
                        "num_res_blocks": unet.layers_per_block,
                        "channel_mult": [c // unet.block_out_channels[0] for c in unet.block_out_channels],
                        "num_head_channels": heads_channels,
                        "use_linear_in_transformer": unet.use_linear_projection,
                        "transformer_depth": 1,
                        "context_dim": unet.cross_attention_dim,
                    }
                },
                "first_stage_config": {
                    "params": {
                        "ddconfig": {
                            "double_z": True,
                            "z_channels": vae.latent_channels,
                            "resolution": 256,
                            "in_channels": vae.in_channels,
                            "out_ch": vae.out_channels,
                            "ch": vae.block_out_channels[0],
                            "ch_mult": [c // vae.block_out_channels[0] for c in vae.block_out_channels],
                            "num_res_blocks": vae.layers_per_block,
                            "attn_resolutions": [],
                            "dropout": 0.0,
                        }
                    }
                },
                "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"},
            },
        }
    }


def write_tiny_dataset(root: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """kohya DreamBooth layout: ``img/10_sks toy/*.png`` with ``.txt`` captions, ``reg/1_toy/*.png``."""
    root = Path(root)
    rng = np.random.RandomState(seed)
    train_dir, reg_dir = root / "img" / "10_sks toy", root / "reg" / "1_toy"
    for folder in (train_dir, reg_dir):
        folder.mkdir(parents=True, exist_ok=True)
    sizes = [(64, 64), (64, 64), (64, 64), (64, 64), (128, 64), (64, 128)]
    for i, size in enumerate(sizes):
        color = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[i % len(SHAPES)]
        _draw(size, COLORS[color], shape, rng).save(train_dir / f"toy_{i:02d}.png")
        (train_dir / f"toy_{i:02d}.txt").write_text(f"sks toy, {color}, {shape}, on the table\n")
    for i in range(2):
        _draw((64, 64), (128, 128, 128), SHAPES[i], rng).save(reg_dir / f"reg_{i:02d}.png")
    return root / "img", root / "reg"


def _draw(size: tuple[int, int], color: tuple[int, int, int], shape: str, rng: np.random.RandomState) -> Image.Image:
    w, h = size
    background = rng.randint(180, 240, size=3)
    pixels = np.ones((h, w, 3), dtype=np.float32) * background
    pixels += rng.randn(h, w, 3) * 6.0
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy, r = w / 2 + rng.randint(-6, 7), h / 2 + rng.randint(-6, 7), min(w, h) / 4
    mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r) if shape == "cube" else (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    pixels[mask] = color
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class TinySD:
    """Where :func:`write_tiny_sd` put everything."""

    root: Path
    sd1_dir: Path
    sd1_file: Path
    sd2_dir: Path
    sd2_file: Path
    sdxl_dir: Path
    sdxl_file: Path
    tokenizer_cache_dir: Path
    train_data_dir: Path
    reg_data_dir: Path


def write_tiny_sd(out: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> TinySD:
    """Write both tiny models as diffusers folders and single-file checkpoints, plus a dataset.

    Layout (kohya's ``--tokenizer_cache_dir`` layout for the single files)::

        out/sd1/  out/sd1.safetensors          SD1-shaped, epsilon prediction
        out/sd2/  out/sd2.safetensors sd2.yaml  SD2-shaped, v prediction
        out/sdxl/ out/sdxl.safetensors         SDXL-shaped (SGM single file), epsilon prediction
        out/tokenizers/{openai_clip-vit-large-patch14,stabilityai_stable-diffusion-2,
                        laion_CLIP-ViT-bigG-14-laion2B-39B-b160k}/
        out/img/10_sks toy/*.png *.txt   out/reg/1_toy/*.png
    """
    out = Path(out)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "tokenizers"
    for v2 in (False, True):
        name = "sd2" if v2 else "sd1"
        tokenizer = write_tiny_tokenizer(cache / family_of(v2).tokenizer_folder, v2)
        model = build_tiny_model(v2, tokenizer, seed)
        save_diffusers_folder(model, out / name)
        save_ldm_checkpoint(model, out / f"{name}.safetensors")
        if v2:
            (out / "sd2.yaml").write_text(yaml.safe_dump(_tiny_ldm_yaml(model), sort_keys=False))
    write_tiny_sdxl(out, cache, seed)
    train_dir, reg_dir = write_tiny_dataset(out, seed)
    return TinySD(
        root=out,
        sd1_dir=out / "sd1",
        sd1_file=out / "sd1.safetensors",
        sd2_dir=out / "sd2",
        sd2_file=out / "sd2.safetensors",
        sdxl_dir=out / "sdxl",
        sdxl_file=out / "sdxl.safetensors",
        tokenizer_cache_dir=cache,
        train_data_dir=train_dir,
        reg_data_dir=reg_dir,
    )
