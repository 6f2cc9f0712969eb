"""Write the tiny SD1/SD2/SDXL models (diffusers folders + single files) and a tiny DreamBooth dataset.

python tools/make_tiny_sd.py --out tiny
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.tiny_sd import write_tiny_sd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of every weight and image")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    tiny = write_tiny_sd(args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"tiny SD1: {tiny.sd1_dir} and {tiny.sd1_file}")
    print(f"tiny SD2 (v-prediction): {tiny.sd2_dir} and {tiny.sd2_file}")
    print(f"tiny SDXL: {tiny.sdxl_dir} and {tiny.sdxl_file}")
    print(f"tokenizers (--tokenizer_cache_dir): {tiny.tokenizer_cache_dir}")
    print(f"dataset (--train_data_dir / --reg_data_dir): {tiny.train_data_dir} {tiny.reg_data_dir}")


if __name__ == "__main__":
    run_cli(main)
