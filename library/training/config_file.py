"""kohya's ``--config_file`` and ``--output_config``: flags in a toml, with kohya's precedence.

Every table's keys are flattened and turned into command-line tokens, so argparse types and checks
them as it does the command line, which wins. Unlike kohya, a key that no flag knows is an error
with a suggestion, and kohya flags this suite does not implement are refused when set instead of
silently ignored (accepted at their defaults, as GUI-exported configs list them all).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

import toml

from library.errors import ConfigError


def parse_or_write_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | None:
    """Parse a training script's flags; with ``--output_config``, write them to --config_file instead (None)."""
    args = parse_args(parser, argv)
    if not args.output_config:
        return args
    if not args.config_file:
        parser.error("--output_config needs --config_file PATH to write to")
    print(f"wrote {write_config_file(args, parser, args.config_file)}")
    return None


# kohya flags with no counterpart here: accepted at their defaults (GUI-exported configs list them
# all), refused with a clear message when set.
UNSUPPORTED_KOHYA_FLAGS = {
    "deepspeed": "DeepSpeed",
    "zero_stage": "DeepSpeed",
    "fp8_base": "float8 base weights",
    "fp8_base_unet": "float8 base weights",
    "huggingface_repo_id": "uploading to the Hugging Face hub",
    "resume_from_huggingface": "resuming from the Hugging Face hub",
    "save_state_to_huggingface": "uploading to the Hugging Face hub",
    "dataset_class": "custom dataset classes",
    "masked_loss": "masked loss",
    "conditioning_data_dir": "masked loss",
    "weighted_captions": "weighted captions",
    "fused_backward_pass": "fused backward passes",
    "cpu_offload_checkpointing": "checkpoint offloading",
    "wandb_api_key": "wandb keys in config files",
}
_UNSUPPORTED_FALSEY = (None, False, "", 0, 0.0, [], "none", "None")


def _config_to_argv(config: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> list[str]:
    """Turn flattened toml keys into command-line tokens so argparse types and validates them."""
    actions = {a.dest: a for a in parser._actions}  # argparse has no public lookup by dest
    unknown = [k for k in config if k not in actions and k not in UNSUPPORTED_KOHYA_FLAGS]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise ConfigError(f"{source}: unknown keys: {', '.join(hints)}")
    argv: list[str] = []
    for key, value in config.items():
        if key in UNSUPPORTED_KOHYA_FLAGS:
            if value not in _UNSUPPORTED_FALSEY:
                raise ConfigError(f"{source}: '{key}' ({UNSUPPORTED_KOHYA_FLAGS[key]}) is not supported by this suite")
            continue
        action = actions[key]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
            if value:
                argv.append(action.option_strings[0])
            continue
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if action.nargs not in ("*", "+") and isinstance(value, list):
            if key == "resolution":
                values = [",".join(str(v) for v in value)]
            else:
                raise ConfigError(f"{source}: '{key}' takes one value, got a list")
        argv.append(action.option_strings[0])
        argv.extend(str(v) for v in values)
    return argv


def read_config_file(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """kohya's ``--config_file``: every table's keys are flattened; returns them as argv tokens."""
    config_path = Path(path if path.endswith(".toml") else f"{path}.toml")
    if not config_path.is_file():
        raise ConfigError(f"--config_file '{config_path}' does not exist")
    try:
        raw = toml.load(config_path)
    except (toml.TomlDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot parse --config_file '{config_path}': {err}") from err
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for sub_key, sub_value in items:
            if isinstance(sub_value, dict):
                raise ConfigError(f"{config_path}: nested table '{key}.{sub_key}' is not supported")
            flat[sub_key] = sub_value
    return _config_to_argv(flat, parser, str(config_path))


def write_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser, path: str) -> Path:
    """kohya's ``--output_config``: the flags that differ from their defaults, as a flat toml."""
    config_path = Path(path if path.endswith(".toml") else f"{path}.toml")
    if config_path.exists():
        raise ConfigError(f"--output_config: '{config_path}' exists; refusing to overwrite it")
    skip = {"config_file", "output_config"}
    changed = {}
    for key, value in vars(args).items():
        if key in skip or value == parser.get_default(key):
            continue
        changed[key] = str(value) if isinstance(value, Path) else value
    config_path.write_text(toml.dumps(changed))
    return config_path


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with kohya's precedence: command line > ``--config_file`` > defaults."""
    args = parser.parse_args(argv)
    if args.config_file and not args.output_config:
        file_argv = read_config_file(args.config_file, parser)
        args = parser.parse_args(file_argv + list(sys.argv[1:] if argv is None else argv))
    return args
