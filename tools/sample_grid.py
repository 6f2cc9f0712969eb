"""Tile a training run's sample images into one picture: a row per prompt, a column per step.

    python tools/sample_grid.py --samples output/quickstart/sample --out grid.png [--scale 2]

Reads kohya's sample file names (``<name>_<step>_<prompt index>_<timestamp>.png``), so it works on
folders written by this suite's or kohya's ``--sample_every_n_steps``/``--sample_every_n_epochs``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from library.cli import run_cli  # the root must be on sys.path first
from library.errors import ConfigError
from library.training.sample_grid import contact_sheet, sample_files


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", required=True, help="a run's sample folder (<output_dir>/sample)")
    parser.add_argument("--out", required=True, help="the picture to write (.png)")
    parser.add_argument("--output_name", help="only this run's samples where a folder holds several")
    parser.add_argument("--scale", type=int, default=1, help="enlarge every cell this many times (nearest pixel)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    if args.scale < 1:
        raise ConfigError(f"--scale must be 1 or more, got {args.scale}")
    sheet = contact_sheet(sample_files(args.samples, args.output_name))
    if args.scale > 1:
        sheet = sheet.resize((sheet.width * args.scale, sheet.height * args.scale), Image.NEAREST)
    sheet.save(args.out)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    run_cli(main)
