"""Train a LoRA-style network on SDXL with kohya sd-scripts' flags and config files.

accelerate launch sdxl_train_network.py --config_file my.toml
python sdxl_train_network.py --pretrained_model_name_or_path sdxl.safetensors --network_module networks.lora ...
"""

from __future__ import annotations

from library.cli import collector_paused_for_imports, run_cli
from library.file_hash import prefetch_model_hashes
from library.training.args import parse_or_write_config
from library.training.sdxl_args import sdxl_train_network_parser


def setup_parser():
    """kohya's entry point name, kept for tools that build sdxl_train_network's parser."""
    return sdxl_train_network_parser()


def main(argv: list[str] | None = None) -> None:
    args = parse_or_write_config(setup_parser(), argv)
    if args is None:
        return
    prefetch_model_hashes(args)  # hashed on another core while the libraries import and the model loads
    with collector_paused_for_imports():
        import library.features  # noqa: F401  (feature packages register what they add)
        from library.training.sdxl_trainer import SDXLNetworkTrainer  # heavy imports only when training

    SDXLNetworkTrainer(args).train()


if __name__ == "__main__":
    run_cli(main)
