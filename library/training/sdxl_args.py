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
    # kohya's SDXL-only flags (--cache_text_encoder_outputs[_to_disk], --disable_mmap_load_safetensors)
    # are train_network.py's here too: SD1/SD2 cache text-encoder outputs and load the same way.
    return parser


def verify_sdxl_training_args(args: argparse.Namespace) -> None:
    """kohya's SDXL rules, then the shared ones (buckets in 32 px steps), before any model loads."""
    if args.v2 or args.v_parameterization:
        raise ConfigError("--v2/--v_parameterization are SD2 flags; SDXL is epsilon-prediction and has no v2 mode")
    if args.clip_skip is not None:
        logger.warning("--clip_skip is ignored: SDXL always conditions on the penultimate layers (as in kohya)")
    verify_training_args(args, reso_step_multiple=32, family_name="SDXL")
