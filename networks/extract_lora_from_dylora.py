"""Cut a DyLoRA file into LoRA files of ranks ``unit, 2·unit, …`` below its own: kohya's script and flags.

    python networks/extract_lora_from_dylora.py --model dylora.safetensors --save_to cut.safetensors --unit 4

writes ``cut-0004.safetensors``, ``cut-0008.safetensors``, … (kohya's names). Each keeps the first ``rank``
rows of ``lora_down`` and columns of ``lora_up`` of every module (modules of a lower rank stay whole) and
every other tensor, ``alpha`` included, unchanged, as kohya's does. Metadata is the source's, with
``ss_network_dim`` set to the new rank, kohya's ``ss_training_comment`` and fresh ``sshs_*`` hashes
(kohya's script copies the source's stale ones).

Imports only torch, safetensors and ``networks/`` siblings, so it also runs inside a kohya checkout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python networks/extract_lora_from_dylora.py`: repo root first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from networks.lora_file import LoRAFileError, load_lora_file, save_lora_file
from networks.network_args import NetworkError

logger = logging.getLogger(__name__)

_DOWN, _UP = "lora_down.weight", "lora_up.weight"


def max_rank(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The largest rank among the file's modules (0 if it holds no ``lora_down``)."""
    return max((value.shape[0] for key, value in state_dict.items() if key.endswith(_DOWN)), default=0)


def truncate(state_dict: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The file cut to ``rank``: the first ``rank`` rows of each ``lora_down``, columns of each ``lora_up``."""
    cut = {}
    for key, value in state_dict.items():
        if key.endswith(_DOWN):
            value = value[:rank]
        elif key.endswith(_UP):
            value = value[:, :rank]
        cut[key] = value.contiguous()
    return cut


def cut_file_name(save_to: str | Path, rank: int) -> Path:
    """kohya's name of the rank-``rank`` file: ``<stem>-0004<suffix>``."""
    path = Path(save_to)
    return path.with_name(f"{path.stem}-{rank:04d}{path.suffix}")


def split(model: str | Path, save_to: str | Path, unit: int) -> list[Path]:
    """Write the cuts of ``model`` at ``unit, 2·unit, … < its rank``; returns the files written."""
    if unit < 1:
        raise NetworkError(f"--unit {unit}: must be at least 1")
    state_dict, metadata = load_lora_file(model)
    full_rank = max_rank(state_dict)
    if full_rank == 0:
        raise NetworkError(f"'{model}' holds no lora_down weights: it is not a kohya LoRA/DyLoRA file")
    if unit >= full_rank:
        raise NetworkError(f"--unit {unit} is not below the rank {full_rank} of '{model}': nothing to extract")
    module = metadata.get("ss_network_module")
    if module is not None and not module.endswith("dylora"):
        logger.warning(f"'{model}' was trained with {module}, not DyLoRA: its lower ranks were not trained alone")
    comment = metadata.get("ss_training_comment", "")
    written = []
    for rank in range(unit, full_rank, unit):
        cut_metadata = {
            **metadata,
            "ss_training_comment": f"split from DyLoRA, rank {full_rank} to {rank}; {comment}",
            "ss_network_dim": str(rank),
        }
        path = cut_file_name(save_to, rank)
        save_lora_file(path, truncate(state_dict, rank), cut_metadata)
        logger.info(f"saved rank {rank} to {path}")
        written.append(path)
    return written


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unit", type=int, required=True, help="rank step of the cuts (DyLoRA's unit or a multiple)")
    parser.add_argument("--save_to", required=True, help="base name of the output files (.safetensors, .ckpt, .pt)")
    parser.add_argument("--model", required=True, help="DyLoRA file to cut (.safetensors, .ckpt, .pt)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = setup_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        split(args.model, args.save_to, args.unit)
    except (NetworkError, LoRAFileError) as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
