"""``--dataset_config`` files and the dataset flags, resolved into dataset blueprints as kohya does.

A kohya ``.toml``/``.json`` dataset config has ``[general]``, ``[[datasets]]`` and
``[[datasets.subsets]]``; each key may appear only at the levels kohya allows (``config_util.py``'s
voluptuous schema, re-stated here as key tables). A value is looked up subset -> dataset ->
general -> command line (flag values or their defaults) -> default; only ``None`` falls through.
Without a dataset config, the same blueprints come from ``--train_data_dir`` (DreamBooth folders
named ``<repeats>_<class tokens>``), ``--reg_data_dir`` and ``--in_json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import toml
import voluptuous as vol

from library.data.buckets import SD_BUCKET_RESO_STEPS_MULTIPLE, BucketSettings, Size, make_bucket_settings
from library.data.captions import CaptionOptions
from library.data.images import check_interpolation
from library.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)


def parse_resolution(value: Any, where: str = "--resolution") -> Size | None:
    """``512``, ``"512"``, ``"768,512"``, ``[768, 512]`` or ``(768, 512)`` -> ``(width, height)``."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        sizes = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        sizes = ()
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise ConfigError(f"{where} must be SIZE or WIDTH,HEIGHT (e.g. 512 or 768,512), got {value!r}")
    return (sizes[0], sizes[-1])


def parse_face_crop_aug_range(value: Any, where: str = "--face_crop_aug_range") -> tuple[float, float] | None:
    """``"2.0,4.0"`` or ``[2.0, 4.0]`` -> ``(2.0, 4.0)`` with low <= high."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        low, high = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be two numbers LOW,HIGH (e.g. 2.0,4.0), got {value!r}") from None
    if not 0 < low <= high:
        raise ConfigError(f"{where} must satisfy 0 < LOW <= HIGH, got {value!r}")
    return (low, high)


# --- the key tables of kohya's schema (config_util.ConfigSanitizer) ------------------------------

# kohya's schema wants floats for these; TOML users write `1` for 1.0, so integers pass too.
_NUMBER = vol.Any(float, int, msg="expected a number")


def _converted(parse):
    """A voluptuous validator from one of the ``parse_*`` functions, keeping its message."""

    def validate(value):
        try:
            return parse(value, "value")
        except ConfigError as error:
            raise vol.Invalid(str(error).removeprefix("value ")) from None

    return validate


DATASET_KEYS = {  # [general] and [[datasets]]
    "batch_size": int,
    "resolution": _converted(parse_resolution),
    "enable_bucket": bool,
    "min_bucket_reso": int,
    "max_bucket_reso": int,
    "bucket_reso_steps": int,
    "bucket_no_upscale": bool,
    "network_multiplier": _NUMBER,
    "validation_seed": int,
    "validation_split": _NUMBER,
    "resize_interpolation": str,
}
SUBSET_KEYS = {  # all three levels
    "num_repeats": int,
    "shuffle_caption": bool,
    "caption_separator": str,
    "keep_tokens": int,
    "keep_tokens_separator": str,
    "secondary_separator": str,
    "enable_wildcard": bool,
    "caption_prefix": str,
    "caption_suffix": str,
    "caption_dropout_rate": _NUMBER,
    "caption_dropout_every_n_epochs": int,
    "caption_tag_dropout_rate": _NUMBER,
    "token_warmup_min": int,
    "token_warmup_step": _NUMBER,
    "color_aug": bool,
    "flip_aug": bool,
    "random_crop": bool,
    "face_crop_aug_range": _converted(parse_face_crop_aug_range),
    "custom_attributes": dict,
    "resize_interpolation": str,
}
DREAMBOOTH_KEYS = {"caption_extension": str, "class_tokens": str, "cache_info": bool}  # all levels, DreamBooth
DREAMBOOTH_SUBSET_KEYS = {vol.Required("image_dir"): str, "is_reg": bool, "alpha_mask": bool}
FINE_TUNING_SUBSET_KEYS = {vol.Required("metadata_file"): str, "image_dir": str, "alpha_mask": bool}

DREAMBOOTH_SUBSET_SCHEMA = {**SUBSET_KEYS, **DREAMBOOTH_KEYS, **DREAMBOOTH_SUBSET_KEYS}
FINE_TUNING_SUBSET_SCHEMA = {**SUBSET_KEYS, **FINE_TUNING_SUBSET_KEYS}
DREAMBOOTH_DATASET_SCHEMA = {**DATASET_KEYS, **SUBSET_KEYS, **DREAMBOOTH_KEYS, "subsets": [DREAMBOOTH_SUBSET_SCHEMA]}
FINE_TUNING_DATASET_SCHEMA = {**DATASET_KEYS, **SUBSET_KEYS, "subsets": [FINE_TUNING_SUBSET_SCHEMA]}
GENERAL_SCHEMA = {**DATASET_KEYS, **SUBSET_KEYS, **DREAMBOOTH_KEYS}

_LEVELS = {
    "[general]": GENERAL_SCHEMA,
    "[[datasets]]": DREAMBOOTH_DATASET_SCHEMA,
    "DreamBooth [[datasets.subsets]]": DREAMBOOTH_SUBSET_SCHEMA,
    "fine-tuning [[datasets.subsets]]": FINE_TUNING_SUBSET_SCHEMA,
}
# Keys of kohya features this suite leaves out, with the reason users see.
_UNSUPPORTED_KEYS = {"conditioning_data_dir": "ControlNet/masked-loss conditioning images are not supported"}


def _validate_dataset(dataset: Any) -> dict:
    """A dataset is fine-tuning if all its subsets have ``metadata_file``, DreamBooth if none has."""
    subsets = dataset.get("subsets", []) if isinstance(dataset, dict) else []
    with_metadata = [isinstance(s, dict) and "metadata_file" in s for s in subsets]
    if subsets and all(with_metadata):
        return vol.Schema(FINE_TUNING_DATASET_SCHEMA)(dataset)
    if not any(with_metadata):
        return vol.Schema(DREAMBOOTH_DATASET_SCHEMA)(dataset)
    raise vol.Invalid(
        "mixes DreamBooth subsets (image_dir) and fine-tuning subsets (metadata_file); "
        "put them in separate [[datasets]]"
    )


DATASET_CONFIG_SCHEMA = vol.Schema({"general": GENERAL_SCHEMA, "datasets": [_validate_dataset]})


def load_dataset_config(path: str | os.PathLike) -> dict:
    """Read and validate a kohya dataset config (``.toml`` or ``.json``, by extension).

    Raises:
        ConfigError: unreadable file, or a key that is unknown, misplaced or of the wrong type,
            named by its path (``datasets[0].subsets[1].imag_dir``) and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--dataset_config: file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            raw = toml.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise ConfigError(f"--dataset_config must be a .toml or .json file: {path}")
    except (toml.TomlDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid {suffix[1:].upper()}: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a table with [general] and [[datasets]]")
    try:
        return DATASET_CONFIG_SCHEMA(raw)
    except vol.MultipleInvalid as errors:
        raise ConfigError(f"{path}: {_describe(errors.errors[0])}") from errors


def _describe(error: vol.Invalid) -> str:
    """``datasets[0].subsets[1].imag_dir: unknown key ...`` for one voluptuous error."""
    location = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path).lstrip(".")
    key = error.path[-1] if error.path else None
    message = error.error_message
    if message == "extra keys not allowed":
        if key in _UNSUPPORTED_KEYS:
            message = f"{_UNSUPPORTED_KEYS[key]}"
        else:
            message = _misplaced_key_message(key)
    elif message == "required key not provided":
        message = "required key missing"
    return f"{location}: {message}" if location else message


def _misplaced_key_message(key: Any) -> str:
    allowed = [level for level, schema in _LEVELS.items() if key in _key_names(schema)]
    if allowed:
        return f"'{key}' is not allowed here; it belongs in {' or '.join(allowed)}"
    known = sorted(set().union(*(_key_names(schema) for schema in _LEVELS.values())))
    close = difflib.get_close_matches(str(key), known, n=1)
    return f"unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else "")


def _key_names(schema: dict) -> set[str]:
    return {k.schema if isinstance(k, vol.Marker) else k for k in schema}


# --- blueprints ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubsetBlueprint:
    """One image folder or metadata file with every option resolved (kohya's subset params)."""

    where: str  # for messages: "datasets[0].subsets[1] in config.toml", "--train_data_dir/10_sks dog"
    image_dir: str | None = None
    metadata_file: str | None = None  # fine-tuning subsets
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
        config = load_dataset_config(config_path)
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
    return blueprints


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
    for key in ("image_dir", "metadata_file", "is_reg", "class_tokens", "custom_attributes", "where"):
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
