"""BK-SDM students of the toy model, trained by ``distill_unet.py`` as a user runs it.

The bench (``bench/bench_quality.py --rows distill``) and the quality test build kohya-style flag
lists here and hand them to ``distill_unet.main``, so what they measure is the command line users
run: the toy model as ``--pretrained_model_name_or_path`` (it is also the teacher), toy images as a
kohya DreamBooth folder, cached latents, kohya's caption dropout (the teacher was pretrained with
10% empty captions, which classifier-free guidance needs). A mode is the set of loss weights:
BK-SDM's KD (task + output KD + feature KD, all at weight 1) against the same budget without KD
(the task loss alone, so the student is only fine-tuned on the images after its weight copy); KD
without the task term (``kd_only``) is what the quality test runs, so that only KD can move the
student.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from library.distill.students import build_student, student_config

# mode name -> distill_unet.py flags that set it
DISTILL_MODES: dict[str, tuple[str, ...]] = {
    "kd": ("--task_loss_weight=1", "--output_kd_weight=1", "--feature_kd_weight=1"),
    "kd_only": ("--task_loss_weight=0", "--output_kd_weight=1", "--feature_kd_weight=1"),
    "no_kd": ("--task_loss_weight=1", "--output_kd_weight=0", "--feature_kd_weight=0"),
    "kd_theseus": (
        "--task_loss_weight=1",
        "--output_kd_weight=1",
        "--feature_kd_weight=1",
        "--theseus",
    ),
}


@dataclass(frozen=True)
class DistillRun:
    """What one distillation run varies; the rest is fixed so runs compare."""

    student: str = "bk_tiny"
    mode: str = "kd"
    max_train_steps: int = 200
    train_batch_size: int = 16
    learning_rate: float = 5e-4
    seed: int = 0


def distill_argv(
    model: str | os.PathLike,
    tokenizers: str | os.PathLike,
    train_data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    run: DistillRun,
    output_name: str = "student",
) -> list[str]:
    """kohya-style flags of ``distill_unet.py`` for ``run``; the student lands in ``output_dir/output_name/``."""
    argv = [
        f"--pretrained_model_name_or_path={model}",
        f"--tokenizer_cache_dir={tokenizers}",
        f"--student={run.student}",
        f"--train_data_dir={train_data_dir}",
        "--caption_extension=.txt",
        "--caption_dropout_rate=0.1",
        "--resolution=64",
        "--cache_latents",
        "--cache_latents_to_disk",  # runs on the same images share one cache
        "--optimizer_type=AdamW",
        f"--learning_rate={run.learning_rate}",
        f"--max_train_steps={run.max_train_steps}",
        f"--train_batch_size={run.train_batch_size}",
        f"--seed={run.seed}",
        "--max_data_loader_n_workers=0",
        f"--output_dir={output_dir}",
        f"--output_name={output_name}",
        *DISTILL_MODES[run.mode],
    ]
    if run.mode == "kd_theseus":
        # The last third of the run the student runs alone.
        argv.append(f"--theseus_schedule={theseus_schedule((2 * run.max_train_steps) // 3)}")
    return argv


def theseus_schedule(full_at_step: int, start: float = 0.3) -> str:
    """``linear:K,B`` with p = ``start`` at step 0 reaching 1 exactly at ``full_at_step`` (K rounded up)."""
    slope = math.ceil((1.0 - start) / max(1, full_at_step) * 1e9) / 1e9
    return f"linear:{slope:.9f},{start}"


def load_student(output_dir: str | os.PathLike, output_name: str = "student") -> UNet2DConditionModel:
    """The saved student UNet (the diffusers folder ``distill_unet.py`` writes), float32, frozen, eval."""
    unet = UNet2DConditionModel.from_pretrained(Path(output_dir) / output_name / "unet", torch_dtype=torch.float32)
    return unet.eval().requires_grad_(False)


def initial_student(teacher: UNet2DConditionModel, student: str) -> UNet2DConditionModel:
    """The student before training: BK-SDM's weight copy from the teacher, where ``distill_unet.py`` starts."""
    unet, _ = build_student(teacher, student_config(teacher.config, student), dtype=torch.float32)
    return unet.eval().requires_grad_(False)
