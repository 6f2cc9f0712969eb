"""``--dataset_config`` files and the dataset flags, resolved into dataset blueprints as kohya does.

A kohya ``.toml``/``.json`` dataset config has ``[general]``, ``[[datasets]]`` and
``[[datasets.subsets]]``; each key may appear only at the levels kohya allows (``config_util.py``'s
voluptuous schema, re-stated as key tables in ``dataset_schema``). A value is looked up subset -> dataset ->
general -> command line (flag values or their defaults) -> default; only ``None`` falls through.
Without a dataset config, the same blueprints come from ``--train_data_dir`` (DreamBooth folders
named ``<repeats>_<class tokens>``), ``--reg_data_dir`` and ``--in_json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.data.buckets import SD_BUCKET_RESO_STEPS_MULTIPLE, BucketSettings, make_bucket_settings
from library.data.captions import CaptionOptions
from library.data.dataset_schema import load_dataset_config, parse_face_crop_aug_range, parse_resolution
from library.data.images import check_interpolation
from library.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)


# --- blueprints ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubsetBlueprint:
    """One image folder or metadata file with every option resolved (kohya's subset params)."""

    where: str  # for messages: "datasets[0].subsets[1] in config.toml", "--train_data_dir/10_sks dog"
    image_dir: str | None = None
    metadata_file: str | None = None  # fine-tuning subsets
    conditioning_data_dir: str | None = None  # mask subsets: a loss mask image per image, same stem
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    cache_info: bool = False
    alpha_mask: bool = False
    num_repeats: int = 1
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    resize_interpolation: str | None = None
    custom_attributes: dict = field(default_factory=dict)
    caption: CaptionOptions = CaptionOptions()


@dataclass(frozen=True)
class DatasetBlueprint:
    """One dataset: shared batch size and bucketing, and its subsets (kohya's dataset params)."""

    where: str
    is_dreambooth: bool
    subsets: tuple[SubsetBlueprint, ...]
    buckets: BucketSettings
    batch_size: int = 1
    network_multiplier: float = 1.0
    prior_loss_weight: float = 1.0
    validation_seed: int | None = None
    validation_split: float = 0.0
    resize_interpolation: str | None = None
    from_dataset_config: bool = False  # selects the form of the ss_* metadata, as in kohya


# Flag names that differ from config keys (kohya's ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME).
_FLAG_TO_KEY = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}
_SUBSET_FIELDS = [f.name for f in dataclasses.fields(SubsetBlueprint) if f.name not in ("where", "caption")]
_CAPTION_FIELDS = [f.name for f in dataclasses.fields(CaptionOptions)]
_BUCKET_KEYS = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
_DATASET_FIELDS = ("batch_size", "network_multiplier", "prior_loss_weight", "validation_seed", "validation_split")
_DEFAULTS = {
    **{f.name: f.default for f in dataclasses.fields(SubsetBlueprint) if f.default is not dataclasses.MISSING},
    **dataclasses.asdict(CaptionOptions()),
    **{f.name: f.default for f in dataclasses.fields(DatasetBlueprint) if f.default is not dataclasses.MISSING},
    "custom_attributes": {},
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
}


def build_blueprints(
    args: argparse.Namespace, reso_step_multiple: int = SD_BUCKET_RESO_STEPS_MULTIPLE
) -> list[DatasetBlueprint]:
    """The datasets to train on, from ``args.dataset_config`` or from the dataset flags.

    Bucket steps must be multiples of ``reso_step_multiple`` (64 for SD1.x/SD2.x, 32 for SDXL).

    ``args`` carries kohya's dataset flags with kohya's names and defaults; they fill every value
    the config file leaves out.
    """
    flags = _flag_values(args)
    config_path = getattr(args, "dataset_config", None)
    if config_path is not None:
        ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, name, None)]
        if ignored:
            logger.warning("%s ignored because --dataset_config is given", ", ".join(ignored))
        config = load_dataset_config(config_path, masked_loss=bool(getattr(args, "masked_loss", False)))
        suffix = f" in {config_path}"
    else:
        config = {"datasets": [{"subsets": _subsets_from_flags(args)}]}
        suffix = ""
    general = config.get("general", {})
    blueprints = [
        _dataset_blueprint(
            dataset, general, flags, f"datasets[{i}]", suffix, config_path is not None, reso_step_multiple
        )
        for i, dataset in enumerate(config.get("datasets", []))
    ]
    if not blueprints:
        raise ConfigError(f"{config_path}: no [[datasets]]")
    if getattr(args, "cache_latents", False) or getattr(args, "cache_latents_to_disk", False):
        check_latents_cacheable(blueprints)
    if getattr(args, "masked_loss", False):
        check_masks_exist(blueprints)
    return blueprints


def check_masks_exist(blueprints: list[DatasetBlueprint]) -> None:
    """--masked_loss needs a mask source somewhere (kohya would silently train unmasked)."""
    subsets = [subset for blueprint in blueprints for subset in blueprint.subsets]
    if not any(subset.alpha_mask or subset.conditioning_data_dir for subset in subsets):
        raise ConfigError(
            "--masked_loss: no subset has masks; set alpha_mask = true (or --alpha_mask) or give subsets "
            "a conditioning_data_dir of mask images in --dataset_config"
        )


def check_latents_cacheable(blueprints: list[DatasetBlueprint]) -> None:
    """kohya forbids latent caching with augmentations that change the pixels every epoch."""
    for subset in (subset for blueprint in blueprints for subset in blueprint.subsets):
        if subset.color_aug or subset.random_crop:
            option = "color_aug" if subset.color_aug else "random_crop"
            raise ConfigError(
                f"{subset.where}: {option} changes the pixels every epoch, so it cannot be used with "
                "--cache_latents or --cache_latents_to_disk"
            )


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The namespace as config keys, with string flags parsed as kohya's prepare_dataset_args does."""
    flags = {_FLAG_TO_KEY.get(name, name): value for name, value in vars(args).items()}
    if getattr(args, "caption_extention", None) is not None:  # kohya's misspelled legacy flag
        flags["caption_extension"] = args.caption_extention
    flags["resolution"] = parse_resolution(flags.get("resolution"))
    flags["face_crop_aug_range"] = parse_face_crop_aug_range(flags.get("face_crop_aug_range"))
    # kohya's --conditioning_data_dir flag is for its ControlNet scripts; train_network never reads it.
    subset_only = (
        "image_dir",
        "metadata_file",
        "conditioning_data_dir",
        "is_reg",
        "class_tokens",
        "custom_attributes",
    )
    for key in (*subset_only, "where"):
        flags.pop(key, None)  # subset-only keys never come from flags
    return flags


def _lookup(key: str, levels: list[dict]) -> Any:
    for level in levels:
        value = level.get(key)
        if value is not None:
            return value
    return _DEFAULTS.get(key)


def _dataset_blueprint(
    dataset: dict, general: dict, flags: dict, location: str, suffix: str, from_config: bool, reso_step_multiple: int
) -> DatasetBlueprint:
    where = location + suffix if from_config else "command line"
    levels = [dataset, general, flags]
    subsets = [
        _subset_blueprint(subset, levels, f"{location}.subsets[{i}]{suffix}" if from_config else subset["where"])
        for i, subset in enumerate(dataset.get("subsets", []))
    ]
    if not subsets:
        raise ConfigError(f"{where}: no [[datasets.subsets]]")
    resolution = _lookup("resolution", levels)
    if resolution is None:
        raise ConfigError(f"{where}: resolution is required (--resolution, or resolution in the dataset config)")
    interpolation = _lookup("resize_interpolation", levels)
    check_interpolation(interpolation, where)
    bucket_values = {key: _lookup(key, levels) for key in _BUCKET_KEYS}
    buckets = make_bucket_settings(resolution, **bucket_values, where=where, reso_step_multiple=reso_step_multiple)
    values = {key: _lookup(key, levels) for key in _DATASET_FIELDS}
    if values["batch_size"] < 1:
        raise ConfigError(f"{where}: batch_size must be at least 1, got {values['batch_size']}")
    if not 0 <= values["validation_split"] < 1:
        raise ConfigError(f"{where}: validation_split must be in [0, 1), got {values['validation_split']}")
    if values["validation_split"] and not all(s.metadata_file is None for s in subsets):
        raise ConfigError(f"{where}: validation_split works on DreamBooth datasets only, as in kohya")
    return DatasetBlueprint(
        where=where,
        is_dreambooth=all(s.metadata_file is None for s in subsets),
        subsets=tuple(subsets),
        buckets=buckets,
        resize_interpolation=interpolation,
        from_dataset_config=from_config,
        **values,
    )


def _subset_blueprint(subset: dict, parents: list[dict], where: str) -> SubsetBlueprint:
    levels = [subset, *parents]
    values = {key: _lookup(key, levels) for key in _SUBSET_FIELDS}
    values["custom_attributes"] = dict(values["custom_attributes"])
    extension = values["caption_extension"]
    if extension and not extension.startswith("."):
        values["caption_extension"] = "." + extension
    check_interpolation(values["resize_interpolation"], where)
    if values["conditioning_data_dir"] is not None:
        for option in ("random_crop", "face_crop_aug_range"):
            if values[option]:
                raise ConfigError(f"{where}: {option} would crop the image but not its conditioning_data_dir mask")
    caption = CaptionOptions(**{key: _lookup(key, levels) for key in _CAPTION_FIELDS})
    return SubsetBlueprint(where=where, caption=caption, **values)


def _subsets_from_flags(args: argparse.Namespace) -> list[dict]:
    """kohya's DreamBooth folders under --train_data_dir/--reg_data_dir, or the --in_json subset."""
    if getattr(args, "in_json", None) is not None:
        return [{"image_dir": args.train_data_dir, "metadata_file": args.in_json, "where": "--in_json"}]
    if getattr(args, "train_data_dir", None) is None:
        raise ConfigError("no training images: pass --train_data_dir, --in_json or --dataset_config")
    subsets = dreambooth_subsets_from_folders(args.train_data_dir, is_reg=False, flag="--train_data_dir")
    if not subsets:
        raise DatasetError(
            f"--train_data_dir {args.train_data_dir} has no '<repeats>_<class tokens>' sub-folders "
            "(e.g. '10_sks dog'); images go in such a sub-folder, not in train_data_dir itself"
        )
    if getattr(args, "reg_data_dir", None) is not None:
        subsets += dreambooth_subsets_from_folders(args.reg_data_dir, is_reg=True, flag="--reg_data_dir")
    return subsets


def dreambooth_subsets_from_folders(parent: str | os.PathLike, *, is_reg: bool, flag: str) -> list[dict]:
    """One subset per sub-folder ``<repeats>_<class tokens>`` (``10_sks dog`` -> 10, ``sks dog``).

    Folders without a numeric prefix, or with repeats below 1, are skipped with a warning, as in
    kohya. Folders are taken in name order (kohya: file-system order).
    """
    parent = Path(parent)
    if not parent.is_dir():
        raise DatasetError(f"{flag} {parent} is not a folder")
    subsets = []
    for folder in sorted(p for p in parent.iterdir() if p.is_dir()):
        repeats, _, class_tokens = folder.name.partition("_")
        try:
            num_repeats = int(repeats)
        except ValueError:
            logger.warning("%s: ignoring folder without a '<repeats>_' prefix: %s", flag, folder)
            continue
        if num_repeats < 1:
            logger.warning("%s: ignoring folder with %d repeats: %s", flag, num_repeats, folder)
            continue
        subsets.append(
            {
                "image_dir": str(folder),
                "num_repeats": num_repeats,
                "is_reg": is_reg,
                "class_tokens": class_tokens,
                "where": f"{flag}/{folder.name}",
            }
        )
    return subsets
