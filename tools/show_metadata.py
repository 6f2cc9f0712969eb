"""Print a safetensors file's metadata as JSON (kohya's ``tools/show_metadata.py``), with its hashes checked.

    python tools/show_metadata.py --model my_lora.safetensors [--summary]

stdout is the metadata, ``json.dumps(..., indent=4, sort_keys=True)`` as kohya prints it (or
"No metadata found"); whether the ``sshs_*`` hashes match the tensors goes to stderr, so the JSON
can be piped. ``--summary`` adds the per-module rank/alpha/norm table of a LoRA file (to stderr).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli  # the root must be on sys.path first
from library.lora_tools.inspection import check_hashes, module_summaries, summary_table
from networks.lora_file import load_lora_file


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a .safetensors file")
    parser.add_argument("--summary", action="store_true", help="also print each LoRA module's rank, alpha and norm")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    state_dict, metadata = load_lora_file(args.model)
    print(json.dumps(metadata, indent=4, sort_keys=True) if metadata else "No metadata found")
    if "sshs_model_hash" in metadata or "sshs_legacy_hash" in metadata:
        print(check_hashes(state_dict, metadata).describe(), file=sys.stderr)
    if args.summary:
        print(summary_table(module_summaries(state_dict, args.model)), file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
