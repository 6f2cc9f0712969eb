"""Resize a LoRA to a lower rank: kohya's ``networks/resize_lora.py`` flags, an exact and fast SVD.

    python resize_lora.py --model big.safetensors --save_to small.safetensors --save_precision fp16 \
        --new_rank 128 --dynamic_method sv_ratio --dynamic_param 8 --verbose
    python resize_lora.py --model big.safetensors --dynamic_method sv_ratio --sweep 2,4,8,16,32,64,128
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from library.cli import run_cli
from library.errors import ConfigError
from library.resize.batch import is_batch, resize_batch
from library.resize.files import SAVE_PRECISIONS, preview_sweep, resize_lora_file
from library.resize.rank_reduction import ResizeRequest
from library.resize.sweep_plot import require_matplotlib, write_sweep_plot
from networks.svd import DYNAMIC_METHODS


def _values(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'")
    return values


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        required=True,
        nargs="+",
        help="LoRA(s) to resize: .safetensors, .ckpt, .pt or .pth files, or a folder",
    )
    parser.add_argument("--save_to", help="resized LoRA to write (a folder when --model names several)")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output (the cap with --dynamic_method)")
    parser.add_argument(
        "--new_conv_rank", type=int, default=None, help="rank of conv (4-D) modules; default: --new_rank"
    )
    parser.add_argument(
        "--save_precision", choices=list(SAVE_PRECISIONS), default=None, help="dtype of the output; default float"
    )
    parser.add_argument("--device", default=None, help="device for the SVDs, e.g. cuda; default cpu")
    parser.add_argument(
        "--dynamic_method",
        choices=DYNAMIC_METHODS,
        default=None,
        help="pick each module's rank from its singular values; --new_rank is the cap",
    )
    parser.add_argument(
        "--dynamic_param",
        type=float,
        default=None,
        help="sv_ratio: keep singular values above max/param (2 or more); sv_fro, sv_cumulative: share to keep (0-1)",
    )
    parser.add_argument("--verbose", action="store_true", help="print every module's ranks and retained norm")
    parser.add_argument(
        "--keep_alpha",
        action="store_true",
        help="keep each module's input alpha and fold the rank change into its factors (same update) instead of"
        " kohya's alpha = alpha/rank * new rank; diffusers, which gives all attention layers one alpha, then loads"
        " dynamic-rank files right",
    )
    parser.add_argument(
        "--sweep",
        type=_values,
        default=None,
        metavar="V1,V2,...",
        help="preview size, retention and ranks for each --dynamic_param (or --new_rank) value; writes nothing",
    )
    parser.add_argument(
        "--sweep_plot",
        default=None,
        metavar="PLOT.png",
        help="with --sweep, also draw file size against retained norm per value into this .png/.svg/.pdf"
        " (needs matplotlib: pip install matplotlib)",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--target_size",
        default=None,
        help="choose all ranks jointly to fit this file size, keeping the most update energy: 50MB, 48MiB, 1.5GB",
    )
    budget.add_argument("--target_ratio", type=float, default=None, help="like --target_size, a share of the input")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    # A sweep supplies the --dynamic_param values itself.
    dynamic_param = args.sweep[0] if args.sweep and args.dynamic_param is None else args.dynamic_param
    request = ResizeRequest(args.new_rank, args.new_conv_rank, args.dynamic_method, dynamic_param, args.keep_alpha)
    budget = args.target_size is not None or args.target_ratio is not None
    if budget and (args.dynamic_method or args.sweep):
        raise ConfigError("--target_size/--target_ratio choose the ranks themselves: drop --dynamic_method/--sweep")
    if args.sweep_plot is not None:
        if args.sweep is None:
            raise ConfigError("--sweep_plot draws the --sweep preview: add --sweep V1,V2,...")
        require_matplotlib(args.sweep_plot)

    def resize_one(model, save_to):
        resize_lora_file(
            model,
            save_to,
            request,
            args.save_precision,
            args.device,
            args.verbose,
            args.target_size,
            args.target_ratio,
        )

    if args.sweep is not None:
        if is_batch(args.model):
            raise ConfigError("--sweep previews one LoRA: give --model a single file")
        if args.save_to:
            logging.info("--sweep writes nothing: --save_to ignored")
        rows = preview_sweep(args.model[0], request, args.sweep, args.save_precision, args.device)
        if args.sweep_plot is not None:
            input_size = Path(args.model[0]).stat().st_size
            write_sweep_plot(rows, args.dynamic_method or "--new_rank", input_size, args.sweep_plot)
            logging.info("sweep plot written to '%s'", args.sweep_plot)
    elif is_batch(args.model):
        resize_batch(args.model, args.save_to, resize_one)
    else:
        resize_one(args.model[0], args.save_to)


def cli() -> None:
    """The installed command (``pip install -e .``): ``main`` with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    cli()
