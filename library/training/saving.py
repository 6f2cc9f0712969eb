"""Output names, checkpoint rotation and the ``ss_*`` / ``modelspec.*`` metadata kohya writes.

Metadata values are strings formatted as kohya formats them (``str(value)``: ``None`` -> "None",
booleans -> "True"/"False"), so tools that read kohya's files read ours. The network-describing
keys (``ss_network_dim`` ...) come from the network as built, not from the command line.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import mimetypes
import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from library.file_hash import file_sha256
from library.models.families import ModelFamily, family_of
from library.training.args import METADATA_FIELDS

SUITE_VERSION = "0.1.0"
MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)


# ---- names ----------------------------------------------------------------------------------


def model_file_name(output_name: str, extension: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """kohya's names: ``name.ext`` (final), ``name-000001.ext`` (epochs), ``name-step00000500.ext`` (steps).

    An empty ``extension`` names a folder (a diffusers model, as kohya's ``--save_model_as diffusers``).
    """
    suffix = f".{extension}" if extension else ""
    if epoch is not None:
        return f"{output_name}-{epoch:06d}{suffix}"
    if step is not None:
        return f"{output_name}-step{step:08d}{suffix}"
    return f"{output_name}{suffix}"


def state_dir_name(output_name: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """``name-000001-state``, ``name-step00000500-state`` or ``name-state``."""
    return model_file_name(output_name, "x", epoch=epoch, step=step)[: -len(".x")] + "-state"


def rotate(
    output_dir: Path, output_name: str, keep: int | None, *, by_step: bool, state: bool, extension: str = ""
) -> list[Path]:
    """Delete all but the newest ``keep`` epoch (or step) checkpoints; returns what was removed.

    A model checkpoint is every entry with its name: the file ``name-000001.ext`` and the folder
    ``name-000001`` (a diffusers model, saved alone or beside a single file), as kohya removes either.
    """
    if not keep:
        return []
    number = r"step\d{8}" if by_step else r"\d{6}"
    suffix = "-state" if state else (rf"(?:\.{re.escape(extension)})?" if extension else "")
    pattern = re.compile(rf"{re.escape(output_name)}-({number}){suffix}$")
    entries: dict[str, list[Path]] = {}
    for path in output_dir.iterdir():
        match = pattern.match(path.name)
        if match:
            entries.setdefault(match[1], []).append(path)
    removed = [path for key in sorted(entries)[:-keep] for path in sorted(entries[key])]
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


# ---- hashes of the base model (A1111's) ------------------------------------------------------


def legacy_model_hash(path: Path) -> str:
    """A1111's old 8-hex model hash: sha256 of 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def full_file_hash(path: Path) -> str:
    """kohya's ``ss_new_*_hash``: the whole file's SHA-256 (prefetched by the scripts at start-up)."""
    return file_sha256(path)


def _model_identity(prefix: str, path: str | None) -> dict[str, str]:
    if not path:
        return {}
    file = Path(path)
    info = {f"ss_{prefix}_name": file.name}
    if file.is_file():
        key = "sd_model" if prefix == "sd_model" else prefix
        info[f"ss_{key}_hash"] = legacy_model_hash(file)
        info[f"ss_new_{key}_hash"] = full_file_hash(file)
    return info


def code_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "(unknown)"
    except (OSError, subprocess.SubprocessError):
        return "(unknown)"


# ---- metadata --------------------------------------------------------------------------------


def training_metadata(
    args: argparse.Namespace,
    *,
    network_metadata: dict[str, str],
    dataset_metadata: dict[str, str],
    optimizer_name: str,
    base_model_version: str,
    v2: bool,
    num_epochs: int,
    num_batches_per_epoch: int,
    started_at: float,
) -> dict[str, str]:
    """The ``ss_*`` keys written at the start of training (kohya's train_network.py set)."""
    te_lr = args.text_encoder_lr[0] if args.text_encoder_lr else None
    values: dict[str, Any] = {
        "ss_session_id": random.SystemRandom().randint(0, 2**32),
        "ss_training_started_at": started_at,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": te_lr,
        "ss_unet_lr": args.unet_lr,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_dropout": args.network_dropout,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": args.full_fp16,
        "ss_v2": v2,
        "ss_base_model_version": base_model_version,
        "ss_clip_skip": args.clip_skip,
        "ss_max_token_length": args.max_token_length,
        "ss_cache_latents": args.cache_latents,
        "ss_seed": args.seed,
        "ss_lowram": args.lowram,
        "ss_noise_offset": args.noise_offset,
        "ss_multires_noise_iterations": args.multires_noise_iterations,
        "ss_multires_noise_discount": args.multires_noise_discount,
        "ss_adaptive_noise_scale": args.adaptive_noise_scale,
        "ss_zero_terminal_snr": args.zero_terminal_snr,
        "ss_training_comment": args.training_comment,
        "ss_sd_scripts_commit_hash": code_revision(),
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_caption_dropout_rate": args.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": args.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": args.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": args.face_crop_aug_range,
        "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_scale_weight_norms": args.scale_weight_norms,
        "ss_ip_noise_gamma": args.ip_noise_gamma,
        "ss_debiased_estimation": bool(args.debiased_estimation_loss),
        "ss_noise_offset_random_strength": args.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": args.ip_noise_gamma_random_strength,
        "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule,
        "ss_huber_scale": args.huber_scale,
        "ss_huber_c": args.huber_c,
        "ss_fp8_base": False,
        "ss_fp8_base_unet": False,
    }
    metadata = {k: str(v) for k, v in values.items()}
    metadata.update(dataset_metadata)
    metadata.update(_model_identity("sd_model", args.pretrained_model_name_or_path))
    metadata.update(_model_identity("vae", args.vae))
    metadata.update(network_metadata)
    if args.no_metadata:
        metadata = {k: v for k, v in metadata.items() if k in MINIMUM_KEYS}
    return metadata


def modelspec_metadata(
    args: argparse.Namespace,
    *,
    v2: bool,
    v_parameterization: bool,
    started_at: float,
    family: ModelFamily | None = None,
) -> dict[str, str]:
    """SAI ModelSpec 1.0.1 keys as kohya writes them for LoRAs of ``family`` (by default SD1.x/SD2.x's)."""
    family = family or family_of(v2)
    architecture = family.modelspec_architecture(v_parameterization)
    side = 768 if v2 and v_parameterization else family.default_resolution
    resolution = args.resolution or (side, side)
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": args.metadata_title or args.output_name or f"LoRA@{started_at}",
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(started_at).replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        "modelspec.implementation_version": f"sd-lite-trainer/{SUITE_VERSION}",
    }
    if args.min_timestep is not None or args.max_timestep is not None:
        spec["modelspec.timestep_range"] = f"{args.min_timestep or 0},{args.max_timestep or 1000}"
    if args.clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(args.clip_skip)
    for name in METADATA_FIELDS[1:]:  # the title is set above
        value = getattr(args, f"metadata_{name}", None)
        if value:
            spec[f"modelspec.{name}"] = thumbnail_data_url(value) if name == "thumbnail" else value
    return spec


def thumbnail_data_url(value: str) -> str:
    """kohya's --metadata_thumbnail: a data URL as given, an image file turned into one."""
    if value.startswith("data:"):
        return value
    path = Path(value)  # verify_training_args checked that it exists
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def per_save_metadata(epoch: int, step: int) -> dict[str, str]:
    return {"ss_training_finished_at": str(time.time()), "ss_steps": str(step), "ss_epoch": str(epoch)}


def json_value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
