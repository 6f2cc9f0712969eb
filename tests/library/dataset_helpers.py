"""Helpers for the dataset tests: kohya's dataset flags as a namespace, dataset copies, a stand-in VAE."""

import argparse
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

# kohya's dataset flags and their argparse defaults (train_util.add_dataset_arguments & co.).
KOHYA_DATASET_DEFAULTS = dict(
    dataset_config=None,
    train_data_dir=None,
    reg_data_dir=None,
    in_json=None,
    dataset_repeats=1,
    resolution=None,
    enable_bucket=False,
    min_bucket_reso=256,
    max_bucket_reso=1024,
    bucket_reso_steps=64,
    bucket_no_upscale=False,
    resize_interpolation=None,
    caption_extension=".caption",
    caption_extention=None,
    shuffle_caption=False,
    caption_separator=",",
    keep_tokens=0,
    keep_tokens_separator="",
    secondary_separator=None,
    enable_wildcard=False,
    caption_prefix=None,
    caption_suffix=None,
    caption_dropout_rate=0.0,
    caption_dropout_every_n_epochs=0,
    caption_tag_dropout_rate=0.0,
    token_warmup_min=1,
    token_warmup_step=0,
    color_aug=False,
    flip_aug=False,
    random_crop=False,
    face_crop_aug_range=None,
    alpha_mask=False,
    cache_info=False,
    cache_latents=False,
    cache_latents_to_disk=False,
    vae_batch_size=1,
    max_token_length=None,
    prior_loss_weight=1.0,
    train_batch_size=1,
    max_data_loader_n_workers=8,
    persistent_data_loader_workers=False,
    validation_seed=None,
    validation_split=0.0,
    debug_dataset=False,
    seed=None,
)


def dataset_args(**overrides) -> argparse.Namespace:
    """What kohya's parser returns for the dataset flags, with ``overrides`` given on the command line."""
    unknown = set(overrides) - set(KOHYA_DATASET_DEFAULTS)
    assert not unknown, f"not a kohya dataset flag: {unknown}"
    return argparse.Namespace(**{**KOHYA_DATASET_DEFAULTS, **overrides})


def copy_tiny_dataset(tiny_sd, destination: Path) -> SimpleNamespace:
    """A writable copy of the tiny DreamBooth dataset: ``img/10_sks toy`` (6 images), ``reg/1_toy`` (2)."""
    shutil.copytree(tiny_sd.train_data_dir, destination / "img")
    shutil.copytree(tiny_sd.reg_data_dir, destination / "reg")
    return SimpleNamespace(
        root=destination,
        train_data_dir=destination / "img",
        reg_data_dir=destination / "reg",
        subject=destination / "img" / "10_sks toy",
        reg=destination / "reg" / "1_toy",
    )


class PoolingVAE(torch.nn.Module):
    """Stands in for ``AutoencoderKL``: the "latents" of an image are its 8x8 average-pooled pixels
    (channels 0-2) and their channel mean (channel 3), so tests can compute them independently."""

    config = SimpleNamespace(scaling_factor=0.18215)

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.encoded_images = 0

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def encode(self, pixels):
        self.encoded_images += pixels.shape[0]
        return SimpleNamespace(latent_dist=_Fixed(pooled_latents(pixels)))


class _Fixed:
    def __init__(self, value):
        self.value = value

    def sample(self, generator=None):
        return self.value


def pooled_latents(pixels: torch.Tensor) -> torch.Tensor:
    pooled = F.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)
