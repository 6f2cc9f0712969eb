"""``sdxl_train_network.py``'s flags: everything ``train_network.py`` takes, plus kohya's SDXL ones."""

from __future__ import annotations

import argparse
import logging

from library.errors import ConfigError
from library.training.args import train_network_parser, verify_training_args

logger = logging.getLogger(__name__)


def sdxl_train_network_parser() -> argparse.ArgumentParser:
    """kohya's sdxl_train_network.py flags (``sdxl_train_util.add_sdxl_training_arguments`` added)."""
    parser = train_network_parser()
    parser.prog = "sdxl_train_network.py"
    parser.description = "Train a LoRA-style network on SDXL"
    g = parser.add_argument_group("SDXL")
    g.add_argument("--cache_text_encoder_outputs", action="store_true", help="encode every caption once, up front")
    g.add_argument(
        "--cache_text_encoder_outputs_to_disk",
        action="store_true",
        help="also keep them in <image>_te_outputs.npz (implies --cache_text_encoder_outputs)",
    )
    g.add_argument(
        "--disable_mmap_load_safetensors",
        action="store_true",
        help="accepted for kohya compatibility; safetensors files are read whole here anyway",
    )
    return parser


def verify_sdxl_training_args(args: argparse.Namespace) -> None:
    """kohya's SDXL rules, then the shared ones (buckets in 32 px steps), before any model loads."""
    if args.v2 or args.v_parameterization:
        raise ConfigError("--v2/--v_parameterization are SD2 flags; SDXL is epsilon-prediction and has no v2 mode")
    if args.cache_text_encoder_outputs_to_disk:
        args.cache_text_encoder_outputs = True
    if args.cache_text_encoder_outputs and not args.network_train_unet_only:
        raise ConfigError(
            "--cache_text_encoder_outputs needs --network_train_unet_only: cached outputs cannot train text encoders"
        )
    if args.clip_skip is not None:
        logger.warning("--clip_skip is ignored: SDXL always conditions on the penultimate layers (as in kohya)")
    if args.sample_prompts:
        raise ConfigError("--sample_prompts is not supported by sdxl_train_network.py yet")
    verify_training_args(args, reso_step_multiple=32, family_name="SDXL")
