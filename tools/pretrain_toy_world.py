"""Pretrain the toy text-to-image model (SD1 layout) on the toy world: VAE, then UNet + text encoder.

python tools/pretrain_toy_world.py --out toy_model --vae_steps 1500 --unet_steps 3000

Writes out/toy_sd1/ (diffusers folder), out/toy_sd1.safetensors (single file), out/tokenizers/
(for --tokenizer_cache_dir), out/vae/ (the stage-1 VAE, reusable with --vae_from) and
out/pretrain_report.json (timings, losses, reconstruction and sample accuracy).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.toy_world.cli import pretrain_main


def main(argv: list[str] | None = None) -> Path:
    return pretrain_main(argv)


if __name__ == "__main__":
    run_cli(main)
