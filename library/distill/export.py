"""Writing a student: a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` (SDXL:
``StableDiffusionXLPipeline``) loads, and optionally the same model as one LDM/SGM file (``.safetensors``/``.ckpt``).

Saves happen mid-training, so nothing here may touch the live models: every part is written from a
CPU copy in the save precision (casting the live student down and back up would lose precision).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers.configuration_utils import ConfigMixin
from torch import nn

from library.models.sdxl import SDXLModel, save_sdxl_diffusers_folder, save_sgm_checkpoint
from library.models.stable_diffusion import StableDiffusionModel, save_diffusers_folder, save_ldm_checkpoint


def cpu_copy(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """``module`` on the CPU in ``dtype`` (floating tensors only), never a second copy on the accelerator.

    Tensors already on the CPU in that dtype are shared, not copied: the copy is for reading.
    """
    state = {
        key: value.detach().to("cpu", dtype if dtype is not None and value.is_floating_point() else value.dtype)
        for key, value in module.state_dict().items()
    }
    with init_empty_weights():
        if isinstance(module, ConfigMixin):  # diffusers models
            clone = type(module).from_config(module.config)
        else:  # transformers models
            clone = type(module)(module.config)
    clone.load_state_dict(state, strict=True, assign=True)
    return clone.eval()


def save_student(
    model: StableDiffusionModel | SDXLModel,
    folder: Path,
    single_file: Path | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``model`` (whose ``unet`` is the student) as a diffusers folder, replacing an earlier one
    of that name only once the new one is complete, and optionally as a single file too (LDM for
    SD1.x/SD2.x, SGM for SDXL)."""
    sdxl = isinstance(model, SDXLModel)
    parts = ("unet", "text_encoder", "vae") + (("text_encoder_2",) if sdxl else ())
    export = dataclasses.replace(model, **{part: cpu_copy(getattr(model, part), dtype) for part in parts})
    staging = folder.with_name(f".{folder.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    (save_sdxl_diffusers_folder if sdxl else save_diffusers_folder)(export, staging)
    if folder.exists():
        replaced = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(replaced, ignore_errors=True)
        folder.rename(replaced)
        staging.rename(folder)
        shutil.rmtree(replaced)
    else:
        staging.rename(folder)
    if single_file is not None:
        (save_sgm_checkpoint if sdxl else save_ldm_checkpoint)(export, single_file)
