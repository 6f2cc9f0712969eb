"""``resize_lora.py``'s work on files: read a LoRA, resize it or preview a sweep, write atomically.

Every check on the flags and the input runs before anything is written, and the output is
written to a temporary file renamed into place, so an error never leaves a partial file; the
input file is only ever read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from library.errors import ConfigError
from library.resize.budget import budget_summary, budget_table, parse_size, plan_budget
from library.resize.lora_pairs import find_lora_pairs
from library.resize.lycoris import lycoris_to_lora
from library.resize.rank_reduction import (
    ResizeRequest,
    ResizeResult,
    cast_tensor,
    is_no_op,
    linear_alpha,
    module_spectra,
    resize_state_dict,
    resized_metadata,
)
from library.resize.report import SweepRow, module_table, summary, sweep_requests, sweep_row, sweep_table
from networks.lora_file import TORCH_SUFFIXES, load_lora_file, save_lora_file

logger = logging.getLogger(__name__)

SAVE_PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OUTPUT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


def save_dtype(save_precision: str | None) -> torch.dtype:
    """kohya's ``--save_precision``: float32 when not given."""
    if save_precision is None:
        return torch.float32
    if save_precision not in SAVE_PRECISIONS:
        raise ConfigError(f"--save_precision must be one of {', '.join(SAVE_PRECISIONS)}, got '{save_precision}'")
    return SAVE_PRECISIONS[save_precision]


def check_output_path(model: str | os.PathLike, save_to: str | os.PathLike | None) -> Path:
    """``--save_to`` must name a new LoRA file, never the input."""
    if not save_to:
        raise ConfigError("--save_to is required: the resized LoRA's file name (.safetensors, .ckpt, .pt or .pth)")
    save_to = Path(save_to)
    if save_to.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--save_to '{save_to}' must end in .safetensors, .ckpt, .pt or .pth")
    model = Path(model)
    if save_to.resolve() == model.resolve() or (save_to.exists() and model.exists() and save_to.samefile(model)):
        raise ConfigError(f"--save_to '{save_to}' is the input --model: write the resized LoRA to a new file")
    return save_to


def _note_precision(state_dict: dict[str, torch.Tensor], save_precision: str | None) -> None:
    half = {v.dtype for v in state_dict.values() if v.dtype in (torch.float16, torch.bfloat16)}
    if save_precision is None and half:
        logger.info(
            "--save_precision not given: saving float32 like kohya although the input is %s "
            "(--save_precision fp16 keeps its size per rank)",
            ", ".join(sorted(str(d).removeprefix("torch.") for d in half)),
        )


def _note_alphas(result: ResizeResult, request: ResizeRequest) -> None:
    alphas = {m.new_alpha for m in result.modules if not m.module.is_conv and m.new_alpha is not None}
    if len(alphas) > 1 and not request.keep_alpha:
        logger.info(
            "modules now have %d different alphas: fine for kohya, A1111 and ComfyUI, but diffusers gives every "
            "attention layer the same alpha; resize with --keep_alpha for a file diffusers reads right",
            len(alphas),
        )


def budget_bytes(model: str | os.PathLike, target_size: str | None, target_ratio: float | None) -> tuple[int, str]:
    """(bytes, label) of ``--target_size`` or ``--target_ratio`` (a share of the input file's size)."""
    if target_size is not None:
        return parse_size(target_size), target_size
    if not 0 < target_ratio <= 1:
        raise ConfigError(f"--target_ratio must be in (0, 1], got {target_ratio}")
    return int(Path(model).stat().st_size * target_ratio), f"{target_ratio:g} of the input"


def resize_lora_file(
    model: str | os.PathLike,
    save_to: str | os.PathLike,
    request: ResizeRequest,
    save_precision: str | None = None,
    device: str | None = None,
    verbose: bool = False,
    target_size: str | None = None,
    target_ratio: float | None = None,
) -> ResizeResult | None:
    """Resize ``model`` into ``save_to`` and print kohya's summary (and the per-module table if ``verbose``).

    With ``target_size``/``target_ratio`` the ranks are chosen jointly to fit that file size
    (:mod:`library.resize.budget`). Returns None when the ranks asked for change nothing: the output
    is then a copy of the input.
    """
    dtype = save_dtype(save_precision)
    save_to = check_output_path(model, save_to)
    budget = None if target_size is None and target_ratio is None else budget_bytes(model, target_size, target_ratio)
    if budget is not None and save_to.suffix != ".safetensors":
        raise ConfigError(f"--target_size/--target_ratio size .safetensors files: --save_to '{save_to}' is not one")
    state_dict, metadata = load_lora_file(model)
    state_dict = lycoris_to_lora(state_dict, str(model))
    _note_precision(state_dict, save_precision)
    choice = None
    if budget is not None:
        request, choice, spectra = plan_budget(
            state_dict, metadata, request, budget[0], budget[1], dtype, str(model), device or "cpu"
        )
    if is_no_op(state_dict, request, str(model)):
        logger.warning(
            "--new_rank %d / --new_conv_rank %d is not below any module's rank: '%s' is a copy of the input",
            request.new_rank,
            request.conv_rank,
            save_to,
        )
        copy = {k: cast_tensor(v, dtype) for k, v in state_dict.items()}
        save_lora_file(save_to, copy, {k: v for k, v in metadata.items() if not k.startswith("sshs_")})
        return None
    result = resize_state_dict(state_dict, request, str(model), device or "cpu", dtype)
    new_metadata = resized_metadata(metadata, request, result.max_old_rank, linear_alpha(result.modules))
    save_lora_file(save_to, result.state_dict, new_metadata)
    _note_alphas(result, request)
    capped = sum(m.choice.capped_at_input for m in result.modules)
    if capped:
        logger.info("%d modules kept their input rank: kohya's rule would add singular values that are zero", capped)
    if verbose:
        print(budget_table(spectra, choice) if choice else module_table(result.modules))
    print(summary(result.modules, save_to.stat().st_size))
    if choice is not None:
        print(budget_summary(choice, budget[1], save_to.stat().st_size))
    logger.info("saved '%s'", save_to)
    return result


def preview_sweep(
    model: str | os.PathLike,
    request: ResizeRequest,
    values: list[float],
    save_precision: str | None = None,
    device: str | None = None,
) -> list[SweepRow]:
    """Print, per ``--sweep`` value, the size, Frobenius retention and ranks a resize would give; writes nothing.

    One singular-value pass serves every value.
    """
    dtype = save_dtype(save_precision)
    try:
        requests = sweep_requests(request, values)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    state_dict, metadata = load_lora_file(model)
    state_dict = lycoris_to_lora(state_dict, str(model))
    owned = {key for pair in find_lora_pairs(state_dict, str(model)) for key in pair.keys}
    others = {k: (v.dtype if not v.is_floating_point() else dtype, tuple(v.shape)) for k, v in state_dict.items()}
    others = {k: spec for k, spec in others.items() if k not in owned}
    spectra = module_spectra(state_dict, str(model), device or "cpu")
    rows = [sweep_row(spectra, r, v, others, metadata, dtype) for r, v in zip(requests, values)]
    precision = {v: k for k, v in SAVE_PRECISIONS.items()}[dtype]
    cap = f"; ranks capped at --new_rank {request.new_rank}, --new_conv_rank {request.conv_rank}"
    print(
        f"{len(spectra)} modules up to rank {max(m.old_rank for m in spectra)}; sizes of {precision} safetensors"
        + (cap if request.dynamic_method else "")
    )
    print(sweep_table(rows, request.dynamic_method or "new_rank", Path(model).stat().st_size))
    return rows
