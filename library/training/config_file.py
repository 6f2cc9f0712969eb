"""kohya's ``--config_file`` toml: read it into command-line tokens, write it back with ``--output_config``.

As in kohya, every table's keys are flattened, the command line wins over the file, and keys that no
flag knows are ignored (the kohya_ss GUI writes bookkeeping keys such as ``epoch`` and
``noise_offset_type``), here with one warning that lists them. Unlike kohya, values go through
argparse, so a wrong type names its flag instead of failing mid-run.
"""

from __future__ import annotations

import argparse
import difflib
import logging
from pathlib import Path
from typing import Any

import toml

from library.errors import ConfigError

logger = logging.getLogger(__name__)

# Values kohya's GUI and hand-written configs use for store_true flags. kohya itself takes any
# value by truthiness (so "false" would switch a flag on); these are the ones with a clear meaning.
_TRUE_WORDS = {"true", "1", "yes", "on"}
_FALSE_WORDS = {"false", "0", "no", "off", ""}


def config_path(path: str) -> Path:
    """kohya appends ``.toml`` when the name has no such extension."""
    return Path(path if path.endswith(".toml") else f"{path}.toml")


def config_bool(value: Any, key: str, source: str) -> bool:
    """A store_true flag's toml value: true/false, 1/0 (the GUI writes ``persistent_data_loader_workers = 1``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ConfigError(f"{source}: '{key}' must be true or false (or 1/0), got {value!r}")


def _value_tokens(action: argparse.Action, key: str, value: Any, source: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if action.nargs not in ("*", "+") and isinstance(value, list):
        if key != "resolution":
            raise ConfigError(f"{source}: '{key}' takes one value, got a list")
        values = [",".join(str(v) for v in value)]
    if action.type is int:
        # GUI number fields may come back as 64.0; an integral float is the integer it means.
        values = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
    return [str(v) for v in values]


def config_to_argv(config: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> list[str]:
    """Flattened toml keys as command-line tokens, so argparse types and checks them like typed flags."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}  # argparse has no public lookup by dest
    unknown = [key for key in config if key not in actions]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        logger.warning("%s: ignoring keys that no flag of this script knows: %s", source, ", ".join(hints))
    argv: list[str] = []
    for key, value in config.items():
        action = actions.get(key)
        if action is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            if config_bool(value, key, source):
                argv.append(action.option_strings[0])
            continue
        argv.append(action.option_strings[0])
        argv.extend(_value_tokens(action, key, value, source))
    return argv


def read_config_file(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """kohya's ``--config_file``: every table's keys are flattened; returns them as argv tokens."""
    file = config_path(path)
    if not file.is_file():
        raise ConfigError(f"--config_file '{file}' does not exist")
    try:
        raw = toml.load(file)
    except (toml.TomlDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot parse --config_file '{file}': {err}") from err
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for sub_key, sub_value in items:
            if isinstance(sub_value, dict):
                raise ConfigError(f"{file}: nested table '{key}.{sub_key}' is not supported")
            flat[sub_key] = sub_value
    return config_to_argv(flat, parser, str(file))


def write_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser, path: str) -> Path:
    """kohya's ``--output_config``: the flags that differ from their defaults, as a flat toml (no API key)."""
    file = config_path(path)
    if file.exists():
        raise ConfigError(f"--output_config: '{file}' exists; refusing to overwrite it")
    skip = {"config_file", "output_config", "wandb_api_key"}
    changed = {}
    for key, value in vars(args).items():
        if key in skip or value == parser.get_default(key):
            continue
        changed[key] = str(value) if isinstance(value, Path) else value
    file.write_text(toml.dumps(changed))
    return file
