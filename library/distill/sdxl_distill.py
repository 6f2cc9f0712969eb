"""What ``distill_unet.py`` refuses on an SDXL model (and SDXL students on an SD1.x/SD2.x one), before loading.

The SDXL path shares the trainer, task, EMA, resume and export with SD1.x/SD2.x; the parts that
read only one text encoder or build SD1 pipelines are not built for SDXL yet, and say so in one line.
"""

from __future__ import annotations

import argparse

from library.distill.sdxl_students import SDXL_STUDENTS
from library.distill.students import BK_STUDENTS
from library.errors import ConfigError

# Flags whose SDXL path is not built: the reason is printed with the flag.
_NOT_ON_SDXL = {
    "theseus": "the Theseus hybrid runs SD1.x/SD2.x UNets only",
    "network_module": "distilling into a network is built for SD1.x/SD2.x only (train it with sdxl_train_network.py)",
    "weighted_captions": "weighted captions are not built for SDXL yet",
    "v2": "SDXL is epsilon-prediction and has no v2 mode",
    "v_parameterization": "SDXL is epsilon-prediction and has no v2 mode",
}


def check_sdxl_distill_args(args: argparse.Namespace, sdxl: bool) -> None:
    """One line per refusal, naming the flag; ``sdxl`` says whether the loaded model is SDXL."""
    model = f"--pretrained_model_name_or_path '{args.pretrained_model_name_or_path}'"
    if not sdxl:
        if args.student in SDXL_STUDENTS:
            raise ConfigError(
                f"--student {args.student} is Segmind's SDXL student but {model} is not an SDXL model "
                f"(use {', '.join(BK_STUDENTS)} for SD1.x/SD2.x)"
            )
        return
    if args.student in BK_STUDENTS:
        raise ConfigError(
            f"--student {args.student} is a BK-SDM student of SD1.x/SD2.x but {model} is SDXL "
            f"(use {' or '.join(SDXL_STUDENTS)})"
        )
    for name, reason in _NOT_ON_SDXL.items():
        if getattr(args, name, None):
            raise ConfigError(f"--{name} cannot be used with an SDXL model in distill_unet.py: {reason}")
