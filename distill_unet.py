"""Distil an SD1.x/SD2.x UNet into a BK-SDM student (or into a network), or an SDXL UNet into Segmind's
SSD-1B/Vega, with kohya sd-scripts' flags.

accelerate launch distill_unet.py --config_file my.toml
python distill_unet.py --pretrained_model_name_or_path model.safetensors --student bk_small --use_ema ...
"""

from __future__ import annotations

from library.cli import collector_paused_for_imports, run_cli
from library.training.args import parse_or_write_config

with collector_paused_for_imports():  # the parser checks student configs against diffusers' UNet: imports it
    from library.distill.args import distill_unet_parser


def setup_parser():
    """kohya's entry point name, kept for tools that build a script's parser."""
    return distill_unet_parser()


def main(argv: list[str] | None = None) -> None:
    args = parse_or_write_config(setup_parser(), argv)
    if args is None:
        return
    with collector_paused_for_imports():
        import library.features  # noqa: F401  (feature packages register what they add, e.g. UNet variants)
        from library.distill.trainer import DistillTrainer  # heavy imports only when training

    DistillTrainer(args).train()


def cli() -> None:
    """The installed command (``pip install -e .``): ``main`` with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    cli()
