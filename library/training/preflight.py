"""Checks that run before the model loads, so that no run trains for hours and then dies on its inputs.

The output folder must be writable (created and probed now, not at the first save), every training
image decodable, and the numbers sane; images far smaller than their bucket are listed in one
warning. Free disk space is checked once the network's size is known, before the first step.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from library.data.dataset_config import DatasetBlueprint
from library.data.image_sources import ImageRecord, load_subset_images
from library.data.latent_cache import NPZ_SUFFIX
from library.errors import ConfigError, DatasetError
from library.training.output_lock import hold_output

logger = logging.getLogger(__name__)

# An image enlarged more than this many times per side to fill its bucket is mostly interpolation.
UPSCALE_WARNING_FACTOR = 4
PROGRESS_BAR_FROM = 200  # images; fewer check in well under a second
NAMES_SHOWN = 10


def check_numbers(args: argparse.Namespace, *, needs_steps: bool) -> None:
    """Flag values that would crash mid-run or train nothing."""
    for flag in ("learning_rate", "unet_lr"):
        value = getattr(args, flag, None)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ConfigError(f"--{flag} {value}: a learning rate must be a finite number >= 0")
    for value in getattr(args, "text_encoder_lr", None) or []:
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"--text_encoder_lr {value}: a learning rate must be a finite number >= 0")
    if needs_steps and not args.max_train_epochs and args.max_train_steps <= 0:
        raise ConfigError(
            f"--max_train_steps {args.max_train_steps} trains nothing: the saved network would do nothing "
            "(give --network_weights to re-save existing weights)"
        )
    if getattr(args, "max_train_epochs", None) is not None and args.max_train_epochs < 0:
        raise ConfigError(f"--max_train_epochs {args.max_train_epochs} must be >= 0")


def check_output_dir(output_dir: str | os.PathLike | None) -> Path:
    """Create ``--output_dir`` and prove it writable with a probe file, or fail with one line."""
    if not output_dir:
        raise ConfigError("--output_dir is required")
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir '{path}' is a file, not a folder")
    probe = path / f".write-probe-{os.getpid()}.tmp"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--output_dir '{path}' is not writable ({err.strerror or err})") from err
    return path


def check_free_space(output_dir: Path, needed_bytes: int, what: str) -> None:
    """Refuse to start when ``output_dir`` lacks room for ``what`` (``needed_bytes``, an estimate)."""
    existing = next(p for p in (Path(output_dir).absolute(), *Path(output_dir).absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise ConfigError(
            f"--output_dir '{output_dir}' has {free / 2**20:.0f} MiB free but {what} needs about "
            f"{needed_bytes / 2**20:.0f} MiB; free some space or choose another --output_dir"
        )


def save_size_estimate(num_parameters: int, save_bytes_per_value: int, save_state: bool) -> int:
    """Bytes of one checkpoint (plus a state folder: fp32 weights and two optimizer moments), with 10% slack."""
    size = num_parameters * save_bytes_per_value + (num_parameters * 12 if save_state else 0)
    return int(size * 1.1) + 2**20


def check_room_for_checkpoint(output_dir: Path, parameters: Sequence[torch.Tensor], with_state: bool) -> None:
    """Room for one checkpoint (and state folder) at the trained weights' size, before the first step."""
    num_values = sum(p.numel() for p in parameters)
    check_free_space(output_dir, save_size_estimate(num_values, 4, with_state), "one checkpoint")


def _has_disk_cache(path: Path) -> bool:
    return any(path.parent.glob(f"{path.stem}_*{NPZ_SUFFIX}")) or path.with_suffix(".npz").is_file()


def _decodes(path: Path) -> str | None:
    """None when the image decodes; else why not. JPEGs decode at 1/8 scale (fast, and catches
    truncation, which ``verify()`` does not); other formats are verified (PNG: every chunk's CRC)."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
            else:
                image.verify()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        return str(err) or type(err).__name__
    return None


def _far_below_bucket(record: ImageRecord, resolution: tuple[int, int]) -> bool:
    width, height = record.size
    return width * height * UPSCALE_WARNING_FACTOR**2 < resolution[0] * resolution[1]


def check_images(blueprints: Sequence[DatasetBlueprint], skip_cached: bool) -> None:
    """Every image decodes (those with a disk latent cache are skipped with ``skip_cached``); one
    warning lists images so small that their bucket enlarges them more than 4x per side."""
    records: list[tuple[ImageRecord, tuple[int, int]]] = []
    listing_logger = logging.getLogger(load_subset_images.__module__)
    listing_logger.disabled = True  # its caption warnings come again when the dataset is built
    try:
        for blueprint in blueprints:
            for index, subset in enumerate(blueprint.subsets):
                records += [(r, blueprint.buckets.resolution) for r in load_subset_images(subset, index).records]
    finally:
        listing_logger.disabled = False
    to_decode = [r for r, _ in records if not (skip_cached and _has_disk_cache(r.path))]
    bar = tqdm(to_decode, desc="checking images", disable=len(to_decode) < PROGRESS_BAR_FROM, leave=False)
    for record in bar:
        reason = _decodes(record.path)
        if reason is not None:
            raise DatasetError(f"cannot decode image {record.path}: {reason}")
    small = sorted({str(r.path) for r, resolution in records if _far_below_bucket(r, resolution)})
    if small:
        shown = ", ".join(small[:NAMES_SHOWN]) + (f" and {len(small) - NAMES_SHOWN} more" if len(small) > 10 else "")
        logger.warning(
            "%d images are more than %dx smaller per side than the training resolution and will be enlarged "
            "(blurry training data): %s",
            len(small),
            UPSCALE_WARNING_FACTOR,
            shown,
        )


def check_before_model(
    args: argparse.Namespace, blueprints: Sequence[DatasetBlueprint], *, needs_steps: bool = True
) -> None:
    """Everything checkable before the model loads (the output folder is checked by the caller first)."""
    check_numbers(args, needs_steps=needs_steps and not getattr(args, "network_weights", None))
    check_images(blueprints, skip_cached=bool(getattr(args, "cache_latents_to_disk", False)))


@contextlib.contextmanager
def claim_output(args: argparse.Namespace, default_name: str = "last") -> Iterator[Path | None]:
    """``--output_dir`` created and probed, then held against a second run of the same ``--output_name``
    (and cleared of a killed run's leftovers) for the block. Only the main process (``RANK`` 0) writes."""
    if getattr(args, "debug_dataset", False):  # writes nothing
        yield None
        return
    is_main = int(os.environ.get("RANK", "0")) == 0
    directory = Path(args.output_dir)
    new_folders = [p for p in (directory, *directory.parents) if not p.exists()] if is_main else []
    if is_main:
        check_output_dir(directory)
    try:
        with hold_output(directory, args.output_name or default_name, is_main):
            yield directory
    except BaseException:
        _remove_if_empty(new_folders)  # a run that fails before writing anything leaves nothing behind
        raise


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first
        try:
            folder.rmdir()
        except OSError:
            return
