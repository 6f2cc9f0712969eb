"""Merge LoRAs into one LoRA of a chosen rank: kohya's ``networks/svd_merge_lora.py`` flags, exact merge + SVD.

    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 \
        --new_rank 32 --new_conv_rank 16 --save_precision fp16 --save_to ab32.safetensors

The merge is exact (factors concatenated) and the truncation is the factored SVD of
``resize_lora.py``: the output is the best rank-k approximation of the exact sum of the updates.
``--dynamic_method``/``--dynamic_param`` pick each module's rank as ``resize_lora.py`` does, with
``--new_rank``/``--new_conv_rank`` as caps. A script over ``library/``, not a module kohya's trainer imports.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli  # the root must be on sys.path first
from library.lora_tools.svd_merge import svd_merge_files
from library.resize.rank_reduction import ResizeRequest
from networks.svd import DYNAMIC_METHODS

PRECISIONS = ["float", "fp16", "bf16"]


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[], help="LoRA files to merge")
    parser.add_argument("--ratios", type=float, nargs="*", default=None, help="one ratio per model (default 1 each)")
    parser.add_argument("--save_to", default=None, help="merged LoRA: .safetensors, .ckpt, .pt or .pth")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output (the cap with --dynamic_method)")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules; default --new_rank")
    parser.add_argument("--save_precision", choices=PRECISIONS, default=None, help="output dtype; default float")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="float", help="accepted for kohya's command lines (float64 inside)"
    )
    parser.add_argument("--device", default=None, help="device for the SVDs, e.g. cuda; default cpu")
    parser.add_argument("--no_metadata", action="store_true", help="accepted for kohya's command lines (no modelspec)")
    parser.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, default=None, help="as in resize_lora.py")
    parser.add_argument("--dynamic_param", type=float, default=None, help="as in resize_lora.py")
    parser.add_argument("--verbose", action="store_true", help="print every module's rank and retained norm")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    request = ResizeRequest(args.new_rank, args.new_conv_rank, args.dynamic_method, args.dynamic_param)
    svd_merge_files(args.models, args.ratios, args.save_to, request, args.save_precision, args.device, args.verbose)


if __name__ == "__main__":
    run_cli(main)
