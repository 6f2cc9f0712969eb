"""Exceptions a user can act on.

Scripts catch :class:`SuiteError` at the top and print its message as one line, so every message
names the file, key or flag at fault and says what to do about it.
"""


class SuiteError(Exception):
    """Base class: a problem with the user's input, reported as a one-line message."""


class CheckpointError(SuiteError, ValueError):
    """A model file is unreadable, truncated, or not a Stable Diffusion checkpoint."""


class TokenizerNotFoundError(SuiteError, FileNotFoundError):
    """No CLIP tokenizer could be found offline for a single-file checkpoint."""


class ConfigError(SuiteError, ValueError):
    """A command-line flag, --config_file or --dataset_config value is wrong."""


class DatasetError(SuiteError, ValueError):
    """Training images or captions are missing or unreadable."""
