"""The ``ffn`` rows of bench/bench_quality.py: narrow FFNs of the toy model, ``pca`` against ``prune`` init.

``tools/compress_ffn.py`` runs as a user runs it (docs/lowrank_ffn.md): ``calibrate`` on toy images
(4 noise levels, with and without captions) and toy prompts sampled with CFG, then per init
``init`` -> ``blockwise`` -> ``theseus`` (progressive replacement, ending with end-to-end
fine-tuning on the task loss once p reaches 1). After each stage the narrow network is applied to a
copy of the original UNet and scored on identical inputs against the original: each FFN's held-out
relative error on the calibration's held-out tokens (mean and worst), prediction MSE on fixed noisy
latents, pixel MSE / PSNR of samples drawn from the same noise, and the classifier's accuracy.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from library.distill.cost import count_parameters
from library.ffn_compression.calibration import Calibration, relative_errors
from library.ffn_compression.unet import compress_unet
from library.toy_world.distill_runs import theseus_schedule
from library.toy_world.dreambooth import load_base
from library.toy_world.evaluate import sample_jobs
from library.toy_world.fidelity import SampleSet, draw_samples, fidelity, prediction_batch, prediction_mse
from library.toy_world.generator import caption, combination_split, write_dataset
from networks import lowrank_ffn
from tools import compress_ffn

INITS = ("pca", "prune")
STAGES = ("init", "blockwise", "theseus")
HEADER = (
    "| init, k/4C | stage | UNet parameters | FFN error mean (worst) | prediction MSE | sample MSE | PSNR "
    "| colour | shape | both | stage CPU |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def add_ffn_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ffn rows")
    g.add_argument("--ffn_blocks", default="all", help="lowrank_ffn's blocks= (kohya block names or all)")
    g.add_argument(
        "--ffn_ratios", nargs="+", type=float, default=[0.25, 0.125], help="narrow widths as fractions of 4C"
    )
    g.add_argument("--ffn_inits", nargs="+", default=list(INITS), choices=list(INITS))
    g.add_argument("--ffn_last_stage", default=STAGES[-1], choices=list(STAGES), help="run the stages up to this one")
    g.add_argument("--ffn_blockwise_steps", type=int, default=200)
    g.add_argument("--ffn_theseus_steps", type=int, default=100, help="p = 1 from half way: the rest is end to end")
    g.add_argument("--ffn_lr", type=float, default=1e-4, help="theseus stage learning rate (AdamW)")
    g.add_argument("--ffn_images", type=int, default=4, help="images per pretraining combination")
    g.add_argument("--ffn_samples", type=int, default=1, help="scored samples per pretraining prompt")


def _common_argv(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={args.model}",
        f"--tokenizer_cache_dir={args.tokenizers}",
        f"--output_dir={out}",
        f"--train_data_dir={data}",
        "--caption_extension=.txt",
        "--resolution=64",
        f"--seed={args.train_seed}",
        "--max_data_loader_n_workers=0",
        "--train_batch_size=16",
    ]


def _network_args(args: argparse.Namespace, ratio: float) -> list[str]:
    return ["--network_args", f"blocks={args.ffn_blocks}", f"ratio={ratio}"]


def _prompt_file(path: Path, combinations: list[tuple[str, str]], seed: int) -> Path:
    """Every fourth pretraining prompt for the calibration's CFG samples (Euler, 20 steps, CFG 4)."""
    lines = [
        f"{caption(c, s)} --w 64 --h 64 --s 20 --l 4 --ss euler --d {seed * 1000 + i}"
        for i, (c, s) in enumerate(combinations[::4])
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _narrowed(original: torch.nn.Module, weights: Path) -> tuple[torch.nn.Module, lowrank_ffn.LowRankFFNNetwork]:
    """A copy of ``original`` with the network of ``weights`` applied (as a consumer applies it)."""
    unet = copy.deepcopy(original)
    network, _ = lowrank_ffn.create_network_from_weights(1.0, weights, None, None, unet)
    network.apply_to(None, unet)
    network.load_weights(weights)
    network.to(torch.float32).eval().requires_grad_(False)
    return unet, network


def _error_cell(errors: dict[str, float]) -> str:
    return f"{statistics.mean(errors.values()):.3f} ({max(errors.values()):.3f})" if errors else "0"


def _row(init, stage, parameters, errors, mse, samples: SampleSet, reference: SampleSet, seconds) -> str:
    close = fidelity(samples, reference)
    rates = samples.accuracy().rates()
    took = "-" if seconds is None else f"{seconds:.0f} s"
    return (
        f"| {init} | {stage} | {parameters:,} | {_error_cell(errors)} | {mse:.4f} | {close.mse:.4f} | "
        f"{close.psnr:.1f} dB | {rates['colour']:.2f} | {rates['shape']:.2f} | {rates['both']:.2f} | {took} |"
    )


def calibrate(args: argparse.Namespace, root: Path, combinations: list[tuple[str, str]]) -> tuple[list[str], Path]:
    """Toy images and prompts of ``combinations`` under ``root``, and the calibrate stage on them;
    returns the flags every later stage shares and the calibration file."""
    data = root / "img"
    write_dataset(data / "1_toy", combinations, args.ffn_images, args.seed)
    prompts = _prompt_file(root / "prompts.txt", combinations, args.seed)
    common = _common_argv(args, data, root / "out")
    blocks = ["--network_args", f"blocks={args.ffn_blocks}"]
    return common, compress_ffn.main(["calibrate", *common, "--calib_prompts", str(prompts), *blocks])


def stage_files(
    args: argparse.Namespace, common: list[str], calibration_file: Path, ratio: float, init: str
) -> Iterator[tuple[str, Path, float | None]]:
    """Run init -> blockwise -> theseus (up to ``--ffn_last_stage``) for one init and width; yields
    (row label, network file, the stage's CPU seconds) as each stage ends. The Theseus stage gives two
    files: its checkpoint when p reaches 1 (half way) and its end, after end-to-end fine-tuning."""
    stages = STAGES[: STAGES.index(args.ffn_last_stage) + 1]
    weights = None
    for stage in stages:
        name = f"{stage}_{init}_{ratio}"
        started = time.process_time()
        half = max(1, args.ffn_theseus_steps // 2)
        if stage == "init":
            flags = ["--calib_file", str(calibration_file), "--init", init, *_network_args(args, ratio)]
        elif stage == "blockwise":
            flags = ["--calib_file", str(calibration_file), "--network_weights", str(weights)]
            flags += ["--max_train_steps", str(args.ffn_blockwise_steps)]
        else:
            flags = ["--network_weights", str(weights), f"--theseus_schedule={theseus_schedule(half)}"]
            flags += ["--max_train_steps", str(args.ffn_theseus_steps), "--optimizer_type", "AdamW"]
            flags += ["--learning_rate", str(args.ffn_lr), "--cache_latents", "--caption_dropout_rate", "0.1"]
            flags += ["--save_every_n_steps", str(half)]  # the student when p reaches 1, before end to end
        weights = compress_ffn.main([stage, *common, *flags, "--output_name", name])
        seconds = time.process_time() - started
        if stage == "theseus":
            yield "theseus (p = 1)", weights.with_name(f"{name}-step{half:08d}{weights.suffix}"), None
            yield "+ end to end", weights, seconds
        else:
            yield stage, weights, seconds


def ffn_rows(args: argparse.Namespace, work: Path) -> list[str]:
    """The original model's row, the calibration, then per init one row per stage; printed as they come."""
    stages = STAGES[: STAGES.index(args.ffn_last_stage) + 1]
    ratios = ", ".join(str(r) for r in args.ffn_ratios)
    print(f"\nNarrow FFNs: blocks={args.ffn_blocks}, ratio {ratios} of 4C, stages {' -> '.join(stages)}")
    print(HEADER, flush=True)
    began, began_wall = time.process_time(), time.perf_counter()
    pretraining, _ = combination_split(args.seed)
    original = load_base(args.model, args.tokenizers)
    jobs = sample_jobs(pretraining, args.ffn_samples, args.seed)
    reference = draw_samples(original, jobs)
    batch = prediction_batch(original, pretraining, 2 * len(pretraining), args.seed)
    rows = [_row("original", "-", count_parameters(original.unet), {}, 0.0, reference, reference, None)]
    print(rows[-1], flush=True)
    started = time.process_time()
    common, calibration_file = calibrate(args, work / "ffn", pretraining)
    print(f"calibration: {time.process_time() - started:.0f} CPU s", flush=True)
    heldout = Calibration.load(calibration_file).heldout
    for ratio, init in [(ratio, init) for ratio in args.ffn_ratios for init in args.ffn_inits]:
        for label, weights, seconds in stage_files(args, common, calibration_file, ratio, init):
            unet, network = _narrowed(original.unet, weights)
            errors = relative_errors(network, heldout)
            samples = draw_samples(original, jobs, unet=unet)
            mse = prediction_mse(unet, original.unet, batch)
            parameters = count_parameters(compress_unet(unet, network))  # what the export stage writes
            rows.append(_row(f"{init}, {ratio}", label, parameters, errors, mse, samples, reference, seconds))
            print(rows[-1], flush=True)
    spent, wall = time.process_time() - began, time.perf_counter() - began_wall
    print(f"ffn rows: {spent:.0f} CPU s ({wall:.0f} s wall)", flush=True)
    return rows
