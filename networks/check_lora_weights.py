"""Check a LoRA file's weights: kohya's ``networks/check_lora_weights.py`` output plus a per-module summary.

    python networks/check_lora_weights.py my_lora.safetensors [-s]

Prints kohya's ``key,shape,mean|w|,min|w|`` lines (a zero ``min`` of an all-zero ``lora_up``
reveals an untrained module), then per module its kind, rank, alpha and the norm of its update,
and whether the ``sshs_*`` hashes in the file match its tensors. A script over ``library/``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli  # the root must be on sys.path first
from library.lora_tools.inspection import check_hashes, kohya_key_lines, module_summaries, summary_table
from networks.lora_file import load_lora_file


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="LoRA file: .safetensors, .ckpt, .pt or .pth")
    parser.add_argument("-s", "--show_all_keys", action="store_true", help="also list tensors that are no LoRA weight")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    state_dict, metadata = load_lora_file(args.file)
    print("\n".join(kohya_key_lines(state_dict, args.show_all_keys)))
    print()
    print(summary_table(module_summaries(state_dict, args.file)))
    if args.file.endswith(".safetensors"):
        print(check_hashes(state_dict, metadata).describe())


if __name__ == "__main__":
    run_cli(main)
