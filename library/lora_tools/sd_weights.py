"""The text-encoder and UNet weights of an SD1/SD2 checkpoint, by kohya's LoRA module names, without building models.

Baking a LoRA into a checkpoint and extracting one from two checkpoints only touch weight tensors,
so the checkpoint is read as tensors: a single LDM file is renamed to diffusers/transformers keys
with ``library.models.ldm_conversion`` (the names kohya's LoRA keys are made from), a diffusers
folder is read file by file. Writing back replaces only the tensors that changed, so everything
else (VAE, EMA weights, SD2's unused OpenCLIP layer, the folder's configs and tokenizer) is kept
bit for bit, in the checkpoint's own dtype unless ``--save_precision`` says otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import CLIPTextConfig, CLIPTextModel

from library.errors import CheckpointError
from library.fileio import atomic_directory, atomic_path, read_state_dict, save_state_dict
from library.models import ldm_architecture as ldm_arch
from library.models import ldm_conversion as conv

TEXT_ENCODER_PREFIX, UNET_PREFIX = "lora_te", "lora_unet"
_FOLDER_PARTS = {"unet": "diffusion_pytorch_model", "text_encoder": "model", "vae": "diffusion_pytorch_model"}


def kohya_name(prefix: str, weight_key: str) -> str:
    """kohya's LoRA module name of a layer: ``a.b.to_q.weight`` -> ``lora_unet_a_b_to_q``."""
    return f"{prefix}.{weight_key.removesuffix('.weight')}".replace(".", "_")


@dataclass
class SDWeights:
    """A checkpoint's text-encoder and UNet tensors by diffusers/transformers key, and how to write them back."""

    source: Path
    v2: bool
    text_encoder: dict[str, torch.Tensor]
    unet: dict[str, torch.Tensor]
    unet_config: dict[str, Any]
    text_config: CLIPTextConfig
    ldm: dict[str, torch.Tensor] | None = None  # the single file's tensors, None for a folder
    changed: set[str] = field(default_factory=set)  # "te:<key>" / "unet:<key>"

    @property
    def family(self) -> str:
        return "SD2" if self.v2 else "SD1"

    def layers(self) -> dict[str, tuple[str, str]]:
        """kohya module name -> (part, key) of every linear and conv weight."""
        found = {}
        for part, prefix, tensors in (
            ("te", TEXT_ENCODER_PREFIX, self.text_encoder),
            ("unet", UNET_PREFIX, self.unet),
        ):
            for key, tensor in tensors.items():
                if key.endswith(".weight") and tensor.dim() in (2, 4):
                    found[kohya_name(prefix, key)] = (part, key)
        return found

    def tensor(self, part: str, key: str) -> torch.Tensor:
        return (self.text_encoder if part == "te" else self.unet)[key]

    def replace(self, part: str, key: str, value: torch.Tensor) -> None:
        (self.text_encoder if part == "te" else self.unet)[key] = value
        self.changed.add(f"{part}:{key}")


def _refuse_other_families(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    if any(k.startswith("conditioner.embedders.") for k in state_dict):
        raise CheckpointError(f"'{path}' is an SDXL checkpoint: only SD1.x/SD2.x checkpoints are supported so far")
    if not ldm_arch.is_sd_checkpoint(state_dict):
        raise CheckpointError(f"'{path}' is not an SD1.x/SD2.x checkpoint (no model.diffusion_model.* keys)")


def _read_single_file(path: Path) -> SDWeights:
    state_dict = ldm_arch.normalize_clip_keys(read_state_dict(path))
    _refuse_other_families(state_dict, path)
    arch = ldm_arch.infer_architecture(state_dict, False)
    unet_config = ldm_arch.unet_config_from_ldm(arch, state_dict)
    unet = conv.convert_unet_from_ldm(state_dict, unet_config)
    with init_empty_weights():
        text_config = CLIPTextConfig(**arch.text_config)
        text_model = CLIPTextModel(text_config)  # shapes only, for SD2's conversion
    text = conv.convert_text_encoder_from_ldm(state_dict, text_model, arch.v2)
    return SDWeights(path, arch.v2, text, unet, unet_config, text_config, ldm=state_dict)


def _weight_file(folder: Path, part: str) -> Path:
    stem = _FOLDER_PARTS[part]
    for suffix in (".safetensors", ".bin"):
        if (folder / part / f"{stem}{suffix}").is_file():
            return folder / part / f"{stem}{suffix}"
    if any((folder / part).glob("*.index.json")):
        raise CheckpointError(f"'{folder / part}' holds sharded weights; merge them into one file first")
    raise CheckpointError(f"'{folder}' is not a diffusers SD folder: no {part}/{stem}.safetensors")


def _read_folder(path: Path) -> SDWeights:
    if not (path / "unet" / "config.json").is_file():
        raise CheckpointError(f"'{path}' is not a diffusers Stable Diffusion folder (no unet/config.json)")
    unet_config = json.loads((path / "unet" / "config.json").read_text())
    if unet_config.get("addition_embed_type") == "text_time":
        raise CheckpointError(f"'{path}' is an SDXL model: only SD1.x/SD2.x checkpoints are supported so far")
    text_config = CLIPTextConfig.from_pretrained(path / "text_encoder")
    text = {conv.canonical_clip_key(k): v for k, v in read_state_dict(_weight_file(path, "text_encoder")).items()}
    unet = read_state_dict(_weight_file(path, "unet"))
    return SDWeights(path, text_config.hidden_act == "gelu", text, unet, unet_config, text_config)


def read_sd_weights(path: str | os.PathLike) -> SDWeights:
    """A single ``.safetensors``/``.ckpt`` SD1/SD2 checkpoint or a diffusers folder, as tensors."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise CheckpointError(f"model '{path}' not found: pass a diffusers folder or a .safetensors/.ckpt file")
    return _read_single_file(path)


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _changed(weights: SDWeights, part: str) -> dict[str, torch.Tensor]:
    tensors = weights.text_encoder if part == "te" else weights.unet
    keys = {entry.split(":", 1)[1] for entry in weights.changed if entry.startswith(f"{part}:")}
    if part == "te" and weights.v2:  # OpenCLIP stores q, k and v as one in_proj tensor
        for key in list(keys):
            if m := re.match(r"(.+\.self_attn\.)[qkv]_proj\.weight$", key):
                keys |= {f"{m[1]}{p}_proj.weight" for p in "qkv"}
    return {k: tensors[k] for k in keys}


def _ldm_tensors(weights: SDWeights) -> dict[str, torch.Tensor]:
    text = _changed(weights, "te")
    updated = dict(weights.ldm)
    updated.update(conv.unet_to_ldm(_changed(weights, "unet"), weights.unet_config))
    updated.update(conv.open_clip_to_ldm(text) if weights.v2 else conv.clip_to_ldm(text))
    return updated


def write_sd_weights(
    weights: SDWeights,
    save_to: str | os.PathLike,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the checkpoint with its changed tensors, in the input's layout (file or folder), atomically.

    ``dtype`` (``--save_precision``) casts every floating tensor; ``None`` keeps each tensor's dtype.
    """
    save_to = Path(save_to)
    if weights.ldm is not None:
        if save_to.suffix not in (".safetensors", ".ckpt"):
            raise CheckpointError(f"--save_to '{save_to}' must end in .safetensors or .ckpt (the input is one file)")
        tensors = _cast(_ldm_tensors(weights), dtype)
        if save_to.suffix == ".safetensors":
            save_state_dict(tensors, save_to, metadata)
        else:
            with atomic_path(save_to) as tmp:
                torch.save({"state_dict": {k: v.contiguous() for k, v in tensors.items()}}, tmp)
        return
    if save_to.suffix:
        raise CheckpointError(f"--save_to '{save_to}' must name a folder: the input is a diffusers folder")
    with atomic_directory(save_to) as tmp:
        shutil.copytree(weights.source, tmp, dirs_exist_ok=True)
        for part, tensors in (("unet", weights.unet), ("text_encoder", weights.text_encoder)):
            changed = part in ("unet", "text_encoder") and any(
                entry.startswith("unet:" if part == "unet" else "te:") for entry in weights.changed
            )
            if changed or dtype is not None:
                target = tmp / _weight_file(weights.source, part).relative_to(weights.source)
                save_state_dict(_cast(tensors, dtype), target)
        if dtype is not None and (weights.source / "vae").is_dir():
            vae_file = _weight_file(weights.source, "vae")
            save_state_dict(_cast(read_state_dict(vae_file), dtype), tmp / vae_file.relative_to(weights.source))
