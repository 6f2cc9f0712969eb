"""Extract a LoRA from a fine-tuned and a base SD1/SD2 checkpoint: kohya's ``networks/extract_lora_from_models.py``.

    python networks/extract_lora_from_models.py --model_org sd15.safetensors --model_tuned tuned.safetensors \
        --dim 32 --conv_dim 16 --save_precision fp16 --save_to extracted.safetensors

kohya's modules, ranks, clamping and key names; the top singular vectors of each weight difference
come from a truncated SVD instead of a full one. A script over ``library/``, not a module kohya's
trainer imports.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import collector_paused_for_imports, run_cli  # the root must be on sys.path first
from library.errors import ConfigError

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model_org", required=True, help="base checkpoint: .safetensors/.ckpt file or diffusers folder"
    )
    parser.add_argument("--model_tuned", required=True, help="fine-tuned checkpoint; the LoRA is tuned - org")
    parser.add_argument("--save_to", required=True, help="LoRA file: .safetensors, .ckpt, .pt or .pth")
    parser.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    parser.add_argument("--conv_dim", type=int, default=None, help="rank for 3x3 convs; default: no conv modules")
    parser.add_argument(
        "--v2", action="store_true", help="accepted for kohya's command lines; SD2 is read from the weights"
    )
    parser.add_argument(
        "--v_parameterization", action="store_true", default=None, help="metadata: v-prediction (default --v2)"
    )
    parser.add_argument("--sdxl", action="store_true", help="SDXL (not supported yet)")
    parser.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None, help="default float")
    parser.add_argument("--device", default=None, help="device for the SVDs, e.g. cuda; default cpu")
    parser.add_argument("--clamp_quantile", type=float, default=0.99, help="clamp factors at this quantile (1: off)")
    parser.add_argument("--min_diff", type=float, default=0.01, help="text encoder skipped if no weight moved more")
    parser.add_argument("--no_metadata", action="store_true", help="accepted for kohya's command lines (no modelspec)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    # After parsing: these import torch, diffusers and transformers (4 s), which --help never needs.
    with collector_paused_for_imports():
        from library.lora_tools.extract import ExtractRequest, extract_lora, extract_metadata
        from library.lora_tools.merge_files import check_save_to
        from library.lora_tools.sd_weights import read_sd_weights
        from library.resize.files import OUTPUT_SUFFIXES, save_dtype
        from networks.lora_file import save_lora_file

    if args.sdxl:
        raise ConfigError("--sdxl: SDXL checkpoints are not supported yet; SD1.x and SD2.x are")
    target = check_save_to(args.save_to, [args.model_org, args.model_tuned])
    if target.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--save_to '{target}' must end in .safetensors, .ckpt, .pt or .pth")
    dtype = save_dtype(args.save_precision)
    request = ExtractRequest(args.dim, args.conv_dim, args.clamp_quantile, args.min_diff)
    original, tuned = read_sd_weights(args.model_org), read_sd_weights(args.model_tuned)
    if args.v2 != original.v2:
        logger.warning(
            "'%s' is %s: --v2 %s ignored", original.source, original.family, "given" if args.v2 else "not given"
        )
    v_parameterization = original.v2 if args.v_parameterization is None else args.v_parameterization
    tensors = extract_lora(original, tuned, request, args.device or "cpu")
    save_lora_file(target, tensors, extract_metadata(original, request, v_parameterization), dtype)
    logger.info("saved '%s': %d modules", target, len(tensors) // 3)


if __name__ == "__main__":
    run_cli(main)
