"""The toolbox's LoRA-file fixtures, for the networks/ scripts' tests."""

from tests.lora_fixtures import tiny_targets, write_lora  # noqa: F401
