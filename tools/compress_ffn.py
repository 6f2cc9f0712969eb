"""Compress a UNet's feed-forwards to narrow ones: calibrate -> init -> blockwise -> theseus -> export.

python tools/compress_ffn.py calibrate --config_file ffn.toml --calib_prompts prompts.txt
python tools/compress_ffn.py init --config_file ffn.toml --init pca --output_name ffn_pca
python tools/compress_ffn.py blockwise --config_file ffn.toml --network_weights out/ffn_pca.safetensors
python tools/compress_ffn.py theseus --config_file ffn.toml --network_weights out/blockwise.safetensors
python tools/compress_ffn.py export --config_file ffn.toml --network_weights out/last.safetensors

Every stage takes train_network.py's flags (and its --config_file) plus a few of its own; the
whole pipeline, with commands and measured figures, is in docs/lowrank_ffn.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.ffn_compression.pipeline import parse_stage_args, run_stage


def main(argv: list[str] | None = None) -> Path:
    return run_stage(parse_stage_args(argv))


if __name__ == "__main__":
    run_cli(main)
