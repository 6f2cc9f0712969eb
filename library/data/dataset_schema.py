"""kohya's dataset config schema: which key goes at which level, with which type, parsed one way.

``[general]``, ``[[datasets]]`` and ``[[datasets.subsets]]`` accept the keys kohya's
``config_util.ConfigSanitizer`` accepts, as key tables validated with voluptuous (as kohya does);
an unknown or misplaced key is named with its path and a suggestion. ``parse_resolution`` and
``parse_face_crop_aug_range`` are the one way these values are read, for the flags as for the files.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import toml
import voluptuous as vol

from library.data.buckets import Size
from library.errors import ConfigError


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
# With --masked_loss, a dataset whose subsets all name conditioning_data_dir takes its loss masks
# from those images (kohya's ControlNet subsets, which keep only these DreamBooth keys).
MASK_SUBSET_KEYS = {vol.Required("image_dir"): str, vol.Required("conditioning_data_dir"): str}
MASK_KEYS = {"caption_extension": str, "cache_info": bool}  # all levels, mask datasets

DREAMBOOTH_SUBSET_SCHEMA = {**SUBSET_KEYS, **DREAMBOOTH_KEYS, **DREAMBOOTH_SUBSET_KEYS}
FINE_TUNING_SUBSET_SCHEMA = {**SUBSET_KEYS, **FINE_TUNING_SUBSET_KEYS}
DREAMBOOTH_DATASET_SCHEMA = {**DATASET_KEYS, **SUBSET_KEYS, **DREAMBOOTH_KEYS, "subsets": [DREAMBOOTH_SUBSET_SCHEMA]}
FINE_TUNING_DATASET_SCHEMA = {**DATASET_KEYS, **SUBSET_KEYS, "subsets": [FINE_TUNING_SUBSET_SCHEMA]}
MASK_SUBSET_SCHEMA = {**SUBSET_KEYS, **MASK_KEYS, **MASK_SUBSET_KEYS}
MASK_DATASET_SCHEMA = {**DATASET_KEYS, **SUBSET_KEYS, **MASK_KEYS, "subsets": [MASK_SUBSET_SCHEMA]}
GENERAL_SCHEMA = {**DATASET_KEYS, **SUBSET_KEYS, **DREAMBOOTH_KEYS}

_LEVELS = {
    "[general]": GENERAL_SCHEMA,
    "[[datasets]]": DREAMBOOTH_DATASET_SCHEMA,
    "DreamBooth [[datasets.subsets]]": DREAMBOOTH_SUBSET_SCHEMA,
    "fine-tuning [[datasets.subsets]]": FINE_TUNING_SUBSET_SCHEMA,
    "mask [[datasets.subsets]] (with --masked_loss)": MASK_SUBSET_SCHEMA,
}
# Keys of kohya features that need a flag, with the message users see without it.
_KEYS_NEEDING_FLAGS = {
    "conditioning_data_dir": "conditioning_data_dir (loss mask images) belongs in [[datasets.subsets]] "
    "and needs --masked_loss"
}


def _validate_dataset(dataset: Any, masked_loss: bool = False) -> dict:
    """A dataset is fine-tuning if all its subsets have ``metadata_file``, DreamBooth if none has;
    with ``masked_loss``, a mask dataset if all have ``conditioning_data_dir`` (kohya's rules)."""
    subsets = dataset.get("subsets", []) if isinstance(dataset, dict) else []
    with_masks = [isinstance(s, dict) and "conditioning_data_dir" in s for s in subsets]
    if masked_loss and subsets and all(with_masks):
        return vol.Schema(MASK_DATASET_SCHEMA)(dataset)
    if masked_loss and any(with_masks):
        raise vol.Invalid("mixes subsets with and without conditioning_data_dir; put them in separate [[datasets]]")
    with_metadata = [isinstance(s, dict) and "metadata_file" in s for s in subsets]
    if subsets and all(with_metadata):
        return vol.Schema(FINE_TUNING_DATASET_SCHEMA)(dataset)
    if not any(with_metadata):
        return vol.Schema(DREAMBOOTH_DATASET_SCHEMA)(dataset)
    raise vol.Invalid(
        "mixes DreamBooth subsets (image_dir) and fine-tuning subsets (metadata_file); "
        "put them in separate [[datasets]]"
    )


def _config_schema(masked_loss: bool) -> vol.Schema:
    return vol.Schema(
        {"general": GENERAL_SCHEMA, "datasets": [lambda dataset: _validate_dataset(dataset, masked_loss)]}
    )


def load_dataset_config(path: str | os.PathLike, *, masked_loss: bool = False) -> dict:
    """Read and validate a kohya dataset config (``.toml`` or ``.json``, by extension).

    ``masked_loss`` (kohya's ``--masked_loss``) admits subsets with ``conditioning_data_dir``.

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
        return _config_schema(masked_loss)(raw)
    except vol.MultipleInvalid as errors:
        raise ConfigError(f"{path}: {_describe(errors.errors[0])}") from errors


def _describe(error: vol.Invalid) -> str:
    """``datasets[0].subsets[1].imag_dir: unknown key ...`` for one voluptuous error."""
    location = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path).lstrip(".")
    key = error.path[-1] if error.path else None
    message = error.error_message
    if message == "extra keys not allowed":
        if key in _KEYS_NEEDING_FLAGS:
            message = _KEYS_NEEDING_FLAGS[key]
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
