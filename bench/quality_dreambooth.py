"""DreamBooth method comparison and LoRA resize rows of the quality bench (docs/quality.md).

``bench/bench_quality.py --rows dreambooth resize`` calls :func:`dreambooth_rows` and
:func:`resize_rows`. Each method trains the same concept set with the same kohya flags
(:func:`library.toy_world.dreambooth.train_network_argv`, which passes ``--caption_dropout_rate``:
without it the unconditional prediction drifts with the concept and CFG pushes samples away from it),
saving a checkpoint every ``--save_every`` steps (kohya's ``--save_every_n_steps``); every
checkpoint's concept accuracy is scored, so "steps to 80%" is the first checkpoint at or above
0.8. The final file gets the full report (concept, class prior, other prior). Every network file
is applied with ``networks.lora``, as a consumer loads it (a Light LoRA saves a plain kohya LoRA).

- Light LoRA variants the suite refuses or lacks (both factors zero, Gaussian aux) train through
  the bench-only module :mod:`bench.lilora_variants`.
- Full UNet fine-tuning, the ceiling, is ``distill_unet.py`` with ``--teacher`` = the model itself
  (so the loaded UNet is the student) and both KD weights 0: the suite's trainer and its diffusion
  loss on the same DreamBooth folders and flags, all UNet weights trainable (the frozen teacher
  still runs each step, about a third more compute than a plain fine-tune).
- Resize: the trained ``lora r4`` and ``lora r16`` files through ``resize_lora.py`` at each
  ``--resize_sv_ratios`` value (rank capped at the source's) and each ``--resize_ranks`` rank.

Train time is the process's CPU seconds (one torch thread): on a shared machine wall time says
more about the neighbours than about the method.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

import distill_unet
import resize_lora
import train_network
from library.toy_world.concept import Concept, write_concept_set
from library.toy_world.dreambooth import (
    DreamBoothRun,
    apply_network_file,
    concept_report,
    load_base,
    score_prompts,
    train_network_argv,
)

FULL = "full unet"


@dataclass(frozen=True)
class Method:
    module: str
    network_args: tuple[str, ...] = ()
    dim: int = 4
    alpha: float = 4.0
    learning_rate: float = 1e-3


def _lilora(rank: int, init: str) -> Method:
    if init in ("both_zero", "gaussian", "gaussian_scaled"):
        return Method("bench.lilora_variants", (f"variant={init}",), rank, float(rank))
    return Method("networks.lilora", (f"init={init}",), rank, float(rank))


METHODS: dict[str, Method | None] = {
    "lora r1": Method("networks.lora", (), 1, 1.0),
    "lora r4": Method("networks.lora", (), 4, 4.0),
    "lora r16": Method("networks.lora", (), 16, 16.0),
    "locon r4": Method("networks.lora", ("conv_dim=4", "conv_alpha=4"), 4, 4.0),
    **{
        f"lilora r{rank} {init}": _lilora(rank, init)
        for rank in (1, 4)
        for init in ("up_zero", "down_zero", "joint", "both_zero", "gaussian")
    },
    "lilora r4 gaussian_scaled": _lilora(4, "gaussian_scaled"),
    # SD1.5's aux/width proportions (100/768-1280 and 50/320-1280) on the toy's 32-128 widths: the
    # default 100/50 clamp to most toy layers' full width, leaving no projection to speak of.
    "lilora r4 up_zero aux12/6": Method("networks.lilora", ("init=up_zero", "aux_down=12", "aux_up=6"), 4, 4.0),
    # docs/lilora.md: an Adam step moves lora_up about sqrt(b / out) as far as a LoRA's, so a few times the lr.
    "lilora r4 up_zero aux12/6 lr4e-3": Method(
        "networks.lilora", ("init=up_zero", "aux_down=12", "aux_up=6"), 4, 4.0, 4e-3
    ),
    FULL: None,  # distill_unet.py, see the module docstring
}
RESIZE_SOURCES = ("lora r4", "lora r16")


def add_dreambooth_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dreambooth and resize rows (bench/quality_dreambooth.py)")
    g.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    g.add_argument(
        "--work_dir", help="keep the concept set, trained files and checkpoints here (default: a temporary folder)"
    )
    g.add_argument("--jobs", type=int, default=2, help="methods trained side by side (processes, one thread each)")
    g.add_argument("--save_every", type=int, default=50, help="checkpoint (and score) every N steps")
    g.add_argument("--checkpoint_samples", type=int, default=16, help="concept samples per checkpoint")
    g.add_argument(
        "--caption_dropout_rate",
        type=float,
        default=0.1,
        help="kohya's flag for every run: the toy model was pretrained with 10%% empty captions and is sampled "
        "with CFG, so the unconditional prediction must keep training (docs/quality.md)",
    )
    g.add_argument(
        "--network_train_unet_only",
        action="store_true",
        help="kohya's flag for every network run (default: the network trains the text encoder too, kohya's default)",
    )
    g.add_argument(
        "--prior_loss_weight",
        type=float,
        default=1.0,
        help="kohya's flag for every run (1: kohya's default; 4 with --other_reg_per_combination 1, --lr_scheduler "
        "cosine and --steps 600 keeps both priors within 5 points, docs/quality.md)",
    )
    g.add_argument(
        "--other_reg_per_combination",
        type=int,
        default=0,
        help="also train on N captioned images of each other-shape pretraining combination (a second "
        "--reg_data_dir folder; default 0: class images only)",
    )
    g.add_argument("--lr_scheduler", default="constant", help="kohya's flag for every run (constant: kohya's default)")
    g.add_argument("--full_lr", type=float, default=1e-4, help="learning rate of full UNet fine-tuning")
    g.add_argument("--resize_sv_ratios", default="128,64,32,16,8,4,2", help="resize_lora.py sv_ratio values")
    g.add_argument("--resize_ranks", default="1,2", help="resize_lora.py fixed ranks")


@dataclass
class Trained:
    """One method's run: the final file or folder, its checkpoints by step, and what it cost."""

    final: Path
    checkpoints: dict[int, Path]
    cpu_seconds: float
    parameters: int
    size_bytes: int


def concept_accuracy(model, concept: Concept, samples: int, seed: int, steps: int = 20) -> float:
    """Samples of the concept prompt read as the concept; the seeds :func:`concept_report` uses."""
    jobs = [(concept.prompt, concept.colour, concept.shape)] * samples
    return score_prompts(model, jobs, seed, steps).rates()["both"]


def _checkpoints(out: Path) -> dict[int, Path]:
    """kohya's ``name-step00000025[.safetensors]`` files or folders by step."""
    return {int(p.name.split("-step")[1][:8]): p for p in out.glob("concept-step*")}


def _cpu_run(main, argv: list[str]) -> float:
    started = time.process_time()
    main(argv)
    return time.process_time() - started


def network_parameters(base, method: Method, unet_only: bool) -> int:
    """Trainable parameters of the network as ``train_network.py`` builds it (UNet and text encoder,
    or the UNet alone with ``--network_train_unet_only``)."""
    model = copy.deepcopy(base)
    module = importlib.import_module(method.module)
    kwargs = dict(arg.split("=", 1) for arg in method.network_args)
    text_encoder = None if unet_only else model.text_encoder
    network = module.create_network(1.0, method.dim, method.alpha, model.vae, text_encoder, model.unet, **kwargs)
    return sum(p.numel() for p in network.get_trainable_params())


def train_method(args: argparse.Namespace, base, concept_dir: Path, work: Path, name: str) -> Trained:
    method = METHODS[name]
    out = work / name.replace(" ", "_")
    extra = [f"--save_every_n_steps={args.save_every}"]
    if method is None:
        run = DreamBoothRun(learning_rate=args.full_lr, max_train_steps=args.steps, train_batch_size=args.batch,
                            seed=args.train_seed, caption_dropout_rate=args.caption_dropout_rate,
                            prior_loss_weight=args.prior_loss_weight, lr_scheduler=args.lr_scheduler)  # fmt: skip
        argv = _full_finetune_argv(args, concept_dir, out, run)
        seconds = _cpu_run(distill_unet.main, argv + extra)
        final = out / "concept"
        weights = final / "unet" / "diffusion_pytorch_model.safetensors"
        parameters = sum(p.numel() for p in base.unet.parameters())
        return Trained(final, _checkpoints(out), seconds, parameters, weights.stat().st_size)
    run = DreamBoothRun(method.module, method.dim, method.alpha, method.network_args, method.learning_rate,
                        args.steps, args.batch, args.train_seed, caption_dropout_rate=args.caption_dropout_rate,
                        train_text_encoder=not args.network_train_unet_only,
                        prior_loss_weight=args.prior_loss_weight, lr_scheduler=args.lr_scheduler)  # fmt: skip
    argv = train_network_argv(args.model, args.tokenizers, concept_dir, out, run)
    seconds = _cpu_run(train_network.main, argv + extra)
    final = out / "concept.safetensors"
    parameters = network_parameters(base, method, args.network_train_unet_only)
    return Trained(final, _checkpoints(out), seconds, parameters, final.stat().st_size)


def _full_finetune_argv(args: argparse.Namespace, concept_dir: Path, out: Path, run: DreamBoothRun) -> list[str]:
    """``distill_unet.py`` flags: the DreamBooth flags without the network ones, the model as its own teacher."""
    argv, skip = [], False
    for flag in train_network_argv(args.model, args.tokenizers, concept_dir, out, run):
        if flag == "--network_args":
            skip = True  # its values follow until the next flag
            continue
        if flag.startswith("--"):
            skip = False
        if skip or flag.startswith(("--network_", "--save_model_as")):
            continue
        argv.append(flag)
    return argv + [
        f"--teacher={args.model}",
        "--task_loss_weight=1",
        "--output_kd_weight=0",
        "--feature_kd_weight=0",
        "--save_model_as=diffusers",
    ]


def with_trained(base, path: Path, full: bool):
    """A copy of the base model with the trained network (or fine-tuned UNet) in place."""
    model = copy.deepcopy(base)
    if full:
        model.unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch.float32)
        model.unet.eval().requires_grad_(False)
    else:
        apply_network_file(model, path, "networks.lora")
    return model


def steps_to(curve: dict[int, float], threshold: float = 0.8) -> str:
    reached = [step for step, value in sorted(curve.items()) if value >= threshold]
    return str(reached[0]) if reached else f"> {max(curve)}" if curve else "-"


def _report_cells(report: dict[str, float]) -> str:
    return " | ".join(f"{report[key]:.2f}" for key in ("concept", "concept_colour", "class_prior", "other_prior"))


def _concept_set(args: argparse.Namespace, work: Path) -> tuple[Concept, Path]:
    concept = Concept(*args.concept.split(), args.token)
    concept_dir = work / "concept"
    write_concept_set(concept_dir, concept, args.images, args.repeats, args.reg_per_colour, args.seed,
                      args.other_reg_per_combination, reuse=True)  # fmt: skip
    return concept, concept_dir


@dataclass
class MethodResult:
    """A trained method scored: its run, the final report and the concept accuracy by step."""

    name: str
    run: Trained
    report: dict[str, float]
    curve: dict[int, float]


def score_method(args: argparse.Namespace, work: Path, name: str) -> MethodResult:
    """Train ``name`` and score its checkpoints and final file (one worker's job)."""
    torch.set_num_threads(args.threads)
    concept, concept_dir = _concept_set(args, work)
    base = load_base(args.model, args.tokenizers)
    run = train_method(args, base, concept_dir, work, name)
    full = METHODS[name] is None
    curve = {
        step: concept_accuracy(with_trained(base, path, full), concept, args.checkpoint_samples, args.seed)
        for step, path in sorted(run.checkpoints.items())
    }
    report = concept_report(with_trained(base, run.final, full), concept, args.samples, args.seed)
    if args.checkpoint_samples == args.samples:  # the same seeds: the report's concept figure
        curve[args.steps] = report["concept"]
    else:
        final = with_trained(base, run.final, full)
        curve[args.steps] = concept_accuracy(final, concept, args.checkpoint_samples, args.seed)
    return MethodResult(name, run, report, curve)


def _in_workers(function, items: list, jobs: int):
    """``function(item)`` for each item, in order; ``jobs`` > 1 runs them in that many spawned processes
    (one torch thread each: on two cores two small runs side by side beat one run on two threads)."""
    if jobs <= 1:
        yield from map(function, items)
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(function, items)


def dreambooth_rows(args: argparse.Namespace, work: Path, methods: list[str]) -> dict[str, MethodResult]:
    """Train each method, print its row (and the concept accuracy curve); the results, for the resize rows."""
    concept, _ = _concept_set(args, work)
    base = load_base(args.model, args.tokenizers)
    before = concept_report(base, concept, args.samples, args.seed)
    print(f"\nDreamBooth '{args.concept}' as '{args.token}', {args.images} images, {args.steps} steps, "
          f"batch {args.batch}, {args.samples} samples per prompt, checkpoints every {args.save_every} steps "
          f"({args.checkpoint_samples} concept samples each)")  # fmt: skip
    print("| method | trainable | file | concept | concept colour | class prior | other prior | train CPU s | "
          "steps to 80% |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    print(f"| base model | - | - | {_report_cells(before)} | - | - |", flush=True)
    results = {}
    for result in _in_workers(partial(score_method, args, work), methods, args.jobs):
        results[result.name] = result
        run = result.run
        print(
            f"| {result.name} | {run.parameters:,} | {run.size_bytes / 1000:,.0f} KB | {_report_cells(result.report)} "
            f"| {run.cpu_seconds:.0f} | {steps_to(result.curve)} |",
            flush=True,
        )
    steps = sorted({step for result in results.values() for step in result.curve})
    print(f"\nConcept accuracy by step ({args.checkpoint_samples} samples per checkpoint)")
    print("| method | " + " | ".join(str(s) for s in steps) + " |\n|---|" + "---|" * len(steps))
    for name, result in results.items():
        print(
            f"| {name} | " + " | ".join(f"{result.curve[s]:.2f}" if s in result.curve else "-" for s in steps) + " |"
        )
    return results


def mean_rank(path: Path) -> float:
    with safe_open(str(path), "pt") as f:
        ranks = [f.get_slice(key).get_shape()[0] for key in f.keys() if key.endswith("lora_down.weight")]  # noqa: SIM118
    return sum(ranks) / max(1, len(ranks))


def score_resized(args: argparse.Namespace, work: Path, job: tuple[str, Path, str, list[str] | None]) -> str:
    """One resize row: ``resize_lora.py`` on the source file with ``flags`` (None: the source as it is)."""
    torch.set_num_threads(args.threads)
    source, source_file, label, flags = job
    concept, _ = _concept_set(args, work)
    path = source_file
    if flags is not None:
        path = work / f"{source.replace(' ', '_')}_{label.replace(' ', '_')}.safetensors"
        with contextlib.redirect_stdout(io.StringIO()):  # its summary lines would split the table
            resize_lora.main(["--model", str(source_file), "--save_to", str(path), *flags])
    base = load_base(args.model, args.tokenizers)
    report = concept_report(with_trained(base, path, False), concept, args.samples, args.seed)
    return (
        f"| {source} | {label} | {mean_rank(path):.2f} | {path.stat().st_size / 1000:,.0f} KB | "
        f"{_report_cells(report)} |"
    )


def resize_rows(args: argparse.Namespace, work: Path, trained: dict[str, MethodResult]) -> None:
    """The trained LoRAs through ``resize_lora.py``: each sv_ratio (rank capped at the source's) and fixed rank."""
    ratios = [float(v) for v in args.resize_sv_ratios.split(",") if v]
    ranks = [int(v) for v in args.resize_ranks.split(",") if v]
    _concept_set(args, work)  # written once here, before workers read it
    missing = [source for source in RESIZE_SOURCES if source not in trained]
    trained = trained | {r.name: r for r in _in_workers(partial(score_method, args, work), missing, args.jobs)}
    print(f"\nResize ('{args.concept}' LoRAs of {args.steps} steps; resize_lora.py, float files)")
    print("| source | resize | mean rank | file | concept | concept colour | class prior | other prior |")
    print("|---|---|---|---|---|---|---|---|")
    jobs = []
    for source in RESIZE_SOURCES:
        result, rank = trained[source], METHODS[source].dim
        print(
            f"| {source} | none | {mean_rank(result.run.final):.2f} | {result.run.size_bytes / 1000:,.0f} KB | "
            f"{_report_cells(result.report)} |",
            flush=True,
        )
        dynamic = [f"--new_rank={rank}", "--dynamic_method=sv_ratio"]
        jobs += [(source, result.run.final, f"sv_ratio {v:g}", [*dynamic, f"--dynamic_param={v}"]) for v in ratios]
        jobs += [(source, result.run.final, f"rank {r}", [f"--new_rank={r}"]) for r in ranks if r < rank]
    for row in _in_workers(partial(score_resized, args, work), jobs, args.jobs):
        print(row, flush=True)
