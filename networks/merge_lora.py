"""Merge LoRAs into an SD checkpoint (``--sd_model``) or into one LoRA: kohya's ``networks/merge_lora.py`` flags.

    python networks/merge_lora.py --sd_model sd15.safetensors --models a.safetensors b.safetensors \
        --ratios 1 0.5 --save_to merged.safetensors
    python networks/merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 --save_to ab.safetensors

Without ``--sd_model`` the LoRAs are merged exactly: the output's rank is the sum of the inputs' and
its update is ``Σ ratio * alpha / rank * up @ down``; ``--kohya_arithmetic`` reproduces kohya's
sum of factors (or, with ``--concat``, kohya's concatenation) instead. A script over ``library/``,
not a module kohya's trainer imports.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli  # the root must be on sys.path first
from library.lora_tools.merge_files import merge_into_checkpoint, merge_into_lora

PRECISIONS = ["float", "fp16", "bf16"]


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd_model", default=None, help="SD1/SD2 checkpoint (file or diffusers folder) to merge into")
    parser.add_argument("--models", nargs="*", default=[], help="LoRA files to merge")
    parser.add_argument("--ratios", type=float, nargs="*", default=None, help="one ratio per model (default 1 each)")
    parser.add_argument("--save_to", default=None, help="output: checkpoint file/folder, or LoRA file")
    parser.add_argument(
        "--save_precision",
        choices=PRECISIONS,
        default=None,
        help="output dtype; default: the checkpoint's own dtypes, float for a LoRA merge",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float",
        help="kohya's merge dtype; used by --kohya_arithmetic (the exact merges run in float64)",
    )
    parser.add_argument(
        "--v2", action="store_true", help="accepted for kohya's command lines; SD2 is read from the weights"
    )
    parser.add_argument(
        "--no_metadata", action="store_true", help="accepted for kohya's command lines (no modelspec is written)"
    )
    parser.add_argument(
        "--concat",
        action="store_true",
        help="kohya: concatenate instead of summing factors; the exact merge always concatenates",
    )
    parser.add_argument("--shuffle", action="store_true", help="permute the merged rank components (same update)")
    parser.add_argument(
        "--kohya_arithmetic",
        action="store_true",
        help="merge LoRAs with kohya's arithmetic (sum of scaled factors, ratio*|ratio|) for kohya's bytes",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    if args.sd_model:
        merge_into_checkpoint(args.sd_model, args.models, args.ratios, args.save_to, args.save_precision)
    else:
        seed = int.from_bytes(os.urandom(4), "little") if args.shuffle else None
        merge_into_lora(
            args.models,
            args.ratios,
            args.save_to,
            args.save_precision,
            args.kohya_arithmetic,
            args.precision,
            args.concat,
            seed,
        )


if __name__ == "__main__":
    run_cli(main)
