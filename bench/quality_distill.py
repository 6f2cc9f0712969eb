"""The ``distill`` rows of bench/bench_quality.py: BK-SDM students of the toy model, with and without KD.

Each student (``--students``) is trained by ``distill_unet.py``'s command line once per mode
(``--distill_modes``: BK-SDM's KD, the same budget without KD, optionally KD inside Theseus) on toy
images of the pretraining combinations, and scored against the teacher on identical inputs:
prediction MSE on fixed noisy latents (what output KD minimises), pixel MSE / PSNR of samples drawn
from the same noise, and the classifier's colour/shape accuracy of those samples. The ``init`` row
of each student is BK-SDM's weight copy before training, so every trained row reads against both
the teacher and its own starting point.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import distill_unet
from library.distill.cost import count_parameters
from library.toy_world.distill_runs import (
    DISTILL_MODES,
    DistillRun,
    distill_argv,
    initial_student,
    load_student,
)
from library.toy_world.dreambooth import load_base
from library.toy_world.evaluate import sample_jobs
from library.toy_world.fidelity import SampleSet, draw_samples, fidelity, prediction_batch, prediction_mse
from library.toy_world.generator import combination_split, write_dataset

STUDENTS = ("bk_base", "bk_small", "bk_tiny")
HEADER = (
    "| UNet | mode | parameters | prediction MSE | sample MSE | PSNR | colour | shape | both | train CPU |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distill rows")
    g.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    g.add_argument("--distill_modes", nargs="+", default=["kd", "no_kd"], choices=list(DISTILL_MODES))
    g.add_argument("--distill_steps", type=int, default=200, help="training steps per student and mode")
    g.add_argument("--distill_batch", type=int, default=16)
    g.add_argument("--distill_lr", type=float, default=5e-4)
    g.add_argument("--distill_images", type=int, default=4, help="training images per pretraining combination")
    g.add_argument("--distill_samples", type=int, default=1, help="scored samples per pretraining prompt")


def _row(name: str, mode: str, parameters: int, mse: float, samples: SampleSet, reference: SampleSet, seconds) -> str:
    close = fidelity(samples, reference)
    rates = samples.accuracy().rates()
    train = "-" if seconds is None else f"{seconds:.0f} s"
    return (
        f"| {name} | {mode} | {parameters:,} | {mse:.4f} | {close.mse:.4f} | {close.psnr:.1f} dB | "
        f"{rates['colour']:.2f} | {rates['shape']:.2f} | {rates['both']:.2f} | {train} |"
    )


def distill_rows(args: argparse.Namespace, work: Path) -> list[str]:
    """Teacher row, then per student its initialisation and one row per mode; printed as they come."""
    print(f"\nDistillation: {args.distill_steps} steps, batch {args.distill_batch}, lr {args.distill_lr}")
    print(HEADER, flush=True)
    began, began_wall = time.process_time(), time.perf_counter()
    pretraining, _ = combination_split(args.seed)
    data = work / "distill_data" / "img"
    write_dataset(data / "1_toy", pretraining, args.distill_images, args.seed)
    teacher = load_base(args.model, args.tokenizers)
    jobs = sample_jobs(pretraining, args.distill_samples, args.seed)
    reference = draw_samples(teacher, jobs)
    batch = prediction_batch(teacher, pretraining, 2 * len(pretraining), args.seed)
    rows = [_row("teacher", "-", count_parameters(teacher.unet), 0.0, reference, reference, None)]
    print(rows[-1], flush=True)
    for student in args.students:
        unet = initial_student(teacher.unet, student)
        samples = draw_samples(teacher, jobs, unet=unet)
        mse = prediction_mse(unet, teacher.unet, batch)
        rows.append(_row(student, "init", count_parameters(unet), mse, samples, reference, None))
        print(rows[-1], flush=True)
        for mode in args.distill_modes:
            run = DistillRun(student, mode, args.distill_steps, args.distill_batch, args.distill_lr, args.train_seed)
            out = work / f"{student}_{mode}"
            started = time.process_time()
            distill_unet.main(distill_argv(args.model, args.tokenizers, data, out, run))
            seconds = time.process_time() - started
            unet = load_student(out)
            samples = draw_samples(teacher, jobs, unet=unet)
            mse = prediction_mse(unet, teacher.unet, batch)
            rows.append(_row(student, mode, count_parameters(unet), mse, samples, reference, seconds))
            print(rows[-1], flush=True)
    spent, wall = time.process_time() - began, time.perf_counter() - began_wall
    print(f"distill rows: {spent:.0f} CPU s ({wall:.0f} s wall)", flush=True)
    return rows
