"""Helpers for the dataset tests: kohya's dataset flags as a namespace, dataset copies, a stand-in VAE."""

import argparse
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from library.training.args import train_network_parser

# The dataset flags the datasets read, checked against train_network.py's real parser.
DATASET_FLAGS = """dataset_config train_data_dir reg_data_dir in_json dataset_repeats resolution enable_bucket
min_bucket_reso max_bucket_reso bucket_reso_steps bucket_no_upscale resize_interpolation caption_extension
caption_extention shuffle_caption caption_separator keep_tokens keep_tokens_separator secondary_separator
enable_wildcard caption_prefix caption_suffix caption_dropout_rate caption_dropout_every_n_epochs
caption_tag_dropout_rate token_warmup_min token_warmup_step color_aug flip_aug random_crop face_crop_aug_range
alpha_mask masked_loss cache_info cache_latents cache_latents_to_disk vae_batch_size max_token_length prior_loss_weight
train_batch_size max_data_loader_n_workers persistent_data_loader_workers validation_seed validation_split
debug_dataset seed""".split()
_PARSER = train_network_parser()
assert set(DATASET_FLAGS) <= {action.dest for action in _PARSER._actions}, "a dataset flag is missing from args.py"
KOHYA_DATASET_DEFAULTS = {name: _PARSER.get_default(name) for name in DATASET_FLAGS}


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
