"""The toolbox's LoRA-file fixtures."""

from tests.lora_fixtures import tiny_targets, write_lora  # noqa: F401
