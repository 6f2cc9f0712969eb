"""``distill_unet.py``'s flags: kohya's training flags plus the student, teacher, loss, Theseus and EMA ones.

Every check that can fail on user input runs here, before a model is loaded or a file written.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from library.distill.students import STUDENTS, check_student_name, read_student_config_file
from library.errors import ConfigError
from library.training.args import TRAINING_FLAG_GROUPS, verify_training_args
from library.training.theseus import SCHEDULE_HELP, parse_replacement_schedule

DTYPE_NAMES = ("float", "fp16", "bf16")  # kohya's --save_precision vocabulary
FOLDER_FORMATS = ("diffusers", "diffusers_safetensors")
FILE_FORMATS = ("safetensors", "ckpt")
NETWORK_FORMATS = ("safetensors", "ckpt", "pt")
DEFAULT_THESEUS_SCHEDULE = "linear:0.0006,0.3"  # BERT-of-Theseus' example: p = 0.3 at step 0, 1 at step 1167

# Network flags that mean nothing without --network_module, with their parser defaults.
_NETWORK_ONLY = {
    "network_dim": None,
    "network_dropout": None,
    "network_args": None,
    "network_weights": None,
    "dim_from_weights": False,
    "unet_lr": None,
    "scale_weight_norms": None,
}
# Flags that cannot apply to distillation (the text encoder is shared and frozen) or are not built.
_REFUSED = {
    "network_train_text_encoder_only": "the text encoder is shared by teacher and student and stays frozen",
    "text_encoder_lr": "the text encoder is shared by teacher and student and stays frozen",
    "base_weights": "merge them into the model first",
    "torch_compile": "it is not supported by distill_unet.py yet",
}


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distillation")
    g.add_argument(
        "--student",
        type=str,
        help=f"student preset built from the loaded model's UNet: {', '.join(STUDENTS)} "
        "(BK-SDM's for SD1.x/SD2.x, Segmind's SSD-1B/Vega for SDXL)",
    )
    g.add_argument(
        "--student_config",
        type=str,
        help="json of UNet2DConditionModel arguments that replace the preset's (or the loaded model's)",
    )
    g.add_argument(
        "--teacher",
        type=str,
        help="model to distil from (diffusers folder or single file); default: --pretrained_model_name_or_path. "
        "Without --student/--student_config the loaded model itself is the student",
    )
    g.add_argument(
        "--teacher_dtype",
        choices=DTYPE_NAMES,
        help="precision of the frozen teacher (default: that of --mixed_precision)",
    )
    g.add_argument("--task_loss_weight", type=float, default=1.0, help="weight of MSE(student, noise or v)")
    g.add_argument("--output_kd_weight", type=float, default=1.0, help="weight of MSE(student, teacher) outputs")
    g.add_argument("--feature_kd_weight", type=float, default=1.0, help="weight of the summed block-output MSEs")
    g.add_argument(
        "--feature_kd_normalize",
        action="store_true",
        help="divide each block's feature term by the teacher feature's mean square (LAPTOP-Diff)",
    )
    g.add_argument("--theseus", action="store_true", help="Theseus progressive replacement of teacher stages")
    g.add_argument(
        "--theseus_schedule",
        type=str,
        help=f"replacement probability: {SCHEDULE_HELP}; default {DEFAULT_THESEUS_SCHEDULE} (BERT-of-Theseus)",
    )
    g.add_argument("--theseus_steps", type=int, help="from this step on the student runs alone (p = 1)")
    g.add_argument("--use_ema", action="store_true", help="save an exponential moving average of the weights")
    g.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (diffusers' EMAModel warm-up applies)")
    g.add_argument(
        "--save_model_as",
        choices=FOLDER_FORMATS + FILE_FORMATS + ("pt",),
        help="student: a diffusers folder (default), or the folder plus a single LDM file (safetensors/ckpt); "
        "with --network_module: the network file's format (default safetensors)",
    )


def distill_unet_parser() -> argparse.ArgumentParser:
    """kohya's training flags and the distillation ones."""
    # "resolve" lets the distillation group redefine --save_model_as with kohya fine_tune.py's formats.
    parser = argparse.ArgumentParser(
        prog="distill_unet.py",
        description="Distil an SD1.x/SD2.x UNet into a smaller student (BK-SDM) or a network, or an SDXL UNet "
        "into SSD-1B/Vega",
        allow_abbrev=False,
        conflict_handler="resolve",
    )
    for add in (*TRAINING_FLAG_GROUPS, add_distill_args):
        add(parser)
    return parser


@dataclass(frozen=True)
class OutputFormat:
    """What a save writes: a diffusers folder, a file of ``extension``, or both."""

    folder: bool
    extension: str  # of the single file; "" when only a folder is written (the loop then names folders)


def output_format(save_model_as: str | None, network: bool) -> OutputFormat:
    """Resolve ``--save_model_as`` for a student (folder, optionally plus a file) or a network (a file)."""
    if network:
        if save_model_as in FOLDER_FORMATS:
            raise ConfigError(
                f"--save_model_as {save_model_as} saves a UNet; with --network_module the output is the network "
                f"file ({', '.join(NETWORK_FORMATS)})"
            )
        return OutputFormat(folder=False, extension=save_model_as or "safetensors")
    if save_model_as == "pt":
        raise ConfigError(
            "--save_model_as pt is for network files; a student is saved as diffusers, safetensors or ckpt"
        )
    return OutputFormat(folder=True, extension=save_model_as if save_model_as in FILE_FORMATS else "")


def verify_distill_args(args: argparse.Namespace, sdxl: bool = False) -> None:
    """kohya's checks (SDXL: buckets in 32 px steps), then the distillation flags' (raises :class:`ConfigError`)."""
    if sdxl:
        verify_training_args(args, reso_step_multiple=32, family_name="SDXL")
    else:
        verify_training_args(args)
    for name, reason in _REFUSED.items():
        if getattr(args, name):
            raise ConfigError(f"--{name} cannot be used with distill_unet.py: {reason}")
    _verify_student_source(args)
    for name in ("task_loss_weight", "output_kd_weight", "feature_kd_weight"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not (args.task_loss_weight or args.output_kd_weight or args.feature_kd_weight):
        raise ConfigError("--task_loss_weight, --output_kd_weight and --feature_kd_weight are all 0: nothing to train")
    _verify_theseus(args)
    if not 0.0 <= args.ema_decay <= 1.0:
        raise ConfigError(f"--ema_decay must be in [0, 1], got {args.ema_decay}")
    output_format(args.save_model_as, network=bool(args.network_module))


def _verify_student_source(args: argparse.Namespace) -> None:
    if args.network_module:
        if args.student or args.student_config:
            raise ConfigError(
                "--network_module trains a network on the loaded model's UNet; it cannot be combined with "
                "--student/--student_config (distil a student first, then load it)"
            )
        return
    for name, default in _NETWORK_ONLY.items():
        if getattr(args, name) != default:
            raise ConfigError(f"--{name} needs --network_module")
    if args.student:
        check_student_name(args.student)
    if args.student_config:
        read_student_config_file(args.student_config)  # unreadable json or unknown keys fail before loading
    if not args.student and not args.student_config and not args.teacher:
        raise ConfigError(
            f"pass --student ({', '.join(STUDENTS)}), --student_config FILE, or --teacher MODEL "
            "to distil the teacher into the loaded model"
        )


def _verify_theseus(args: argparse.Namespace) -> None:
    if not args.theseus:
        for name in ("theseus_schedule", "theseus_steps"):
            if getattr(args, name) is not None:
                raise ConfigError(f"--{name} needs --theseus")
        return
    parse_replacement_schedule(args.theseus_schedule or DEFAULT_THESEUS_SCHEDULE)
    if args.theseus_steps is not None and args.theseus_steps < 0:
        raise ConfigError(f"--theseus_steps must be >= 0, got {args.theseus_steps}")
