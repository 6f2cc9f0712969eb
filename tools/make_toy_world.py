"""Write the toy world's dataset: 64 px coloured shapes with captions, split into pretraining and held-out.

python tools/make_toy_world.py --out toy --per_combination 10
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.toy_world.cli import make_dataset_main


def main(argv: list[str] | None = None) -> Path:
    return make_dataset_main(argv)


if __name__ == "__main__":
    run_cli(main)
