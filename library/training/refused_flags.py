"""kohya flags this suite cannot honour: parsed with kohya's defaults, refused with one line when set.

kohya_ss GUI configs list many of them at their defaults, so they must parse; a value other than
the default would silently change nothing here, so it is an error naming the flag and the reason.
"""

from __future__ import annotations

import argparse

from library.errors import ConfigError

# kohya flags with no counterpart here: parsed with kohya's defaults (GUI-written configs list
# them), refused with one line when set. Each entry: why it cannot apply, argparse keywords.
_DEEPSPEED = "DeepSpeed (several GPUs train through accelerate's multi-process launch instead)"
_HUB = "the Hugging Face hub (everything here runs offline)"
_FLAG: dict = {"action": "store_true"}
_TEXT: dict = {"type": str}
_OFFLOAD: dict = {"type": str, "choices": [None, "cpu", "nvme"]}
UNSUPPORTED_KOHYA_FLAGS: dict[str, tuple[str, dict]] = {
    "deepspeed": (_DEEPSPEED, _FLAG),
    "zero_stage": (_DEEPSPEED, {"type": int, "default": 2, "choices": [0, 1, 2, 3]}),
    "offload_optimizer_device": (_DEEPSPEED, _OFFLOAD),
    "offload_optimizer_nvme_path": (_DEEPSPEED, _TEXT),
    "offload_param_device": (_DEEPSPEED, _OFFLOAD),
    "offload_param_nvme_path": (_DEEPSPEED, _TEXT),
    "zero3_init_flag": (_DEEPSPEED, _FLAG),
    "zero3_save_16bit_model": (_DEEPSPEED, _FLAG),
    "fp16_master_weights_and_gradients": (_DEEPSPEED, _FLAG),
    "huggingface_repo_id": (_HUB, _TEXT),
    "huggingface_repo_type": (_HUB, _TEXT),
    "huggingface_path_in_repo": (_HUB, _TEXT),
    "huggingface_token": (_HUB, _TEXT),
    "huggingface_repo_visibility": (_HUB, _TEXT),
    "save_state_to_huggingface": (_HUB, _FLAG),
    "resume_from_huggingface": (_HUB, _FLAG),
    "async_upload": (_HUB, _FLAG),
    "fp8_base": ("float8 base weights", _FLAG),
    "fp8_base_unet": ("float8 base weights", _FLAG),
    "dataset_class": ("custom dataset classes", _TEXT),
    "fused_backward_pass": ("fused backward passes (kohya: Adafactor on SDXL and newer models)", _FLAG),
    "cpu_offload_checkpointing": ("checkpoint offloading (kohya: DiT models only)", _FLAG),
    "conditioning_data_dir": ("kohya's ControlNet flag (masks: conditioning_data_dir in a dataset subset)", _TEXT),
}


def add_unsupported_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("kohya flags refused when set (see README)")
    for name, (reason, kwargs) in UNSUPPORTED_KOHYA_FLAGS.items():
        g.add_argument(f"--{name}", help=f"not supported: {reason}", **kwargs)


def refuse_unsupported(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """One line for the first kohya flag set to something this suite cannot do.

    Empty values count as unset, as kohya reads them (``huggingface_repo_id = ""`` uploads nothing).
    """
    for name, (reason, _) in UNSUPPORTED_KOHYA_FLAGS.items():
        value = getattr(args, name, None)
        if value != parser.get_default(name) and value not in (None, "", False, []):
            raise ConfigError(f"--{name}: {reason} is not supported by this suite")
