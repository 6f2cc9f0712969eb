"""``merge_lora.py``'s work on files: check the flags and inputs, merge, write atomically."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from library.errors import ConfigError
from library.lora_tools.lora_merge import exact_merge, kohya_merge, merged_metadata, merged_state_dict
from library.lora_tools.lora_sets import read_loras
from library.resize.files import OUTPUT_SUFFIXES, SAVE_PRECISIONS, save_dtype
from networks.lora_file import save_lora_file

logger = logging.getLogger(__name__)


def check_save_to(save_to: str | os.PathLike | None, inputs: list[str]) -> Path:
    """``--save_to`` is required and is none of the inputs."""
    if not save_to:
        raise ConfigError("--save_to is required: where to write the merged model")
    save_to = Path(save_to)
    for path in map(Path, inputs):
        if save_to.resolve() == path.resolve():
            raise ConfigError(f"--save_to '{save_to}' is an input: write the merge to a new file")
    return save_to


def precision_dtype(precision: str | None) -> torch.dtype | None:
    return None if precision is None else save_dtype(precision)


def merge_into_checkpoint(
    sd_model: str, models: list[str], ratios: list[float] | None, save_to: str, save_precision: str | None
) -> None:
    """Bake the LoRAs into ``sd_model`` and write it (same layout; its dtypes unless ``save_precision``)."""
    # Checkpoints need transformers and diffusers (3-4 s to import); LoRA-to-LoRA merges do not.
    from library.lora_tools.checkpoint_merge import bake_loras
    from library.lora_tools.sd_weights import read_sd_weights, write_sd_weights

    target = check_save_to(save_to, [sd_model, *models])
    dtype = precision_dtype(save_precision)
    inputs, ratios = read_loras(models, ratios)
    weights = read_sd_weights(sd_model)
    bake_loras(weights, inputs, ratios, dtype)
    write_sd_weights(weights, target, dtype)
    logger.info("saved '%s'", target)


def merge_into_lora(
    models: list[str],
    ratios: list[float] | None,
    save_to: str,
    save_precision: str | None,
    kohya_arithmetic: bool = False,
    precision: str = "float",
    concat: bool = False,
    shuffle_seed: int | None = None,
) -> dict[str, str]:
    """Merge the LoRAs into one LoRA file: exactly (factors concatenated) or with kohya's arithmetic."""
    target = check_save_to(save_to, models)
    if target.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--save_to '{target}' must end in .safetensors, .ckpt, .pt or .pth")
    merge_dtype = SAVE_PRECISIONS[precision]
    dtype = precision_dtype(save_precision) or (merge_dtype if kohya_arithmetic else torch.float32)
    inputs, ratios = read_loras(models, ratios)
    if kohya_arithmetic:
        modules = kohya_merge(inputs, ratios, merge_dtype, concat, shuffle_seed)
    else:
        if concat:
            logger.info("--concat: the exact merge always concatenates the factors (each part keeps its scale)")
        modules = exact_merge(inputs, ratios, shuffle_seed)
    for lora in inputs:
        if lora.other_keys:
            logger.warning(
                "'%s': %d non-LoRA keys left out (first: %s)", lora.path, len(lora.other_keys), lora.other_keys[0]
            )
    metadata = merged_metadata(inputs, ratios, modules)
    written = save_lora_file(target, merged_state_dict(modules, dtype), metadata)
    ranks = sorted({m.down.shape[0] for m in modules})
    logger.info("saved '%s': %d modules, ranks %s", target, len(modules), ", ".join(map(str, ranks)))
    return written
