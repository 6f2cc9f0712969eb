"""Prior preservation measured finely enough to decide "within 5 points" (docs/quality.md).

The quality bench scores 16 concept samples and 40 per prior: a rate then has a standard error of
about 0.06, too coarse for a 5-point bar. This calibration trains one DreamBooth recipe (LoRA r4,
kohya's flags through :class:`library.toy_world.dreambooth.DreamBoothRun`) at several training seeds
and scores the chosen checkpoints on 64 concept samples, 8 per class colour (80) and 4 of every
other-shape pretraining prompt (200). The base model is scored on the same noise, so the change of
each prior is a paired difference with its own standard error (about 0.03 on 200 samples).

    python -m bench.quality_prior --model assets/toy_world/toy_sd1.safetensors \\
        --tokenizers assets/toy_world/tokenizers   # the documented recipe, 5 seeds, ~12 min on 2 cores

Training seeds vary kohya's ``--seed`` only. The world (held-out split, concept and prior images,
sample noise) comes from ``--world_seed``, which must be the model's pretraining seed (0 for the
committed model): another split would score prompts the model never learnt as priors.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import train_network  # noqa: E402
from bench.quality_dreambooth import _checkpoints, _cpu_run, _in_workers, with_trained  # noqa: E402
from library.toy_world.concept import Concept, write_concept_set  # noqa: E402
from library.toy_world.dreambooth import (  # noqa: E402
    DreamBoothRun,
    load_base,
    report_jobs,
    score_report,
    train_network_argv,
)


@dataclass
class Scored:
    """One worker's result: per-sample verdicts by step and set (the base model: step 0)."""

    train_seed: int | None
    hits: dict[int, dict[str, list[bool]]]
    train_cpu_seconds: float = 0.0


def paired_change(after: list[bool], before: list[bool]) -> tuple[float, float]:
    """Mean change of a rate scored twice on the same samples, and its standard error.

    The same noise per sample makes the two readings correlated; the spread of the per-sample
    differences, not of the two rates, gives the error of their difference.
    """
    if len(after) != len(before) or len(after) < 2:
        raise ValueError(f"paired samples of equal length >= 2 needed, got {len(after)} and {len(before)}")
    differences = [float(a) - float(b) for a, b in zip(after, before)]
    mean = sum(differences) / len(differences)
    variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
    return mean, math.sqrt(variance / len(differences))


def meets_bars(hits: dict[str, list[bool]], base: dict[str, list[bool]], concept_bar: float, points: float) -> bool:
    """The concept read at ``concept_bar`` or better, and neither prior more than ``points`` below the base."""
    concept = sum(hits["concept"]) / len(hits["concept"])
    drops = [paired_change(hits[name], base[name])[0] for name in ("class_prior", "other_prior")]
    # 1e-9: a drop of exactly ``points`` (e.g. 10 of 200 samples) is at the bar, whatever the float rounding
    return concept >= concept_bar and all(drop >= -points / 100 - 1e-9 for drop in drops)


def _concept(args: argparse.Namespace) -> Concept:
    return Concept(*args.concept.split(), args.token)


def score_seed(args: argparse.Namespace, work: Path, train_seed: int | None) -> Scored:
    """Train at ``train_seed`` and score each of ``--score_steps`` (``None``: score the base model)."""
    torch.set_num_threads(args.threads)
    jobs = report_jobs(
        _concept(args), args.world_seed, args.concept_samples, args.class_samples, args.other_samples, True
    )
    base = load_base(args.model, args.tokenizers)

    def hits_of(model) -> dict[str, list[bool]]:
        scored = score_report(model, jobs, args.world_seed, args.sample_steps)
        return {name: accuracy.hits for name, accuracy in scored.items()}

    if train_seed is None:
        return Scored(None, {0: hits_of(base)})
    run = DreamBoothRun(learning_rate=args.learning_rate, max_train_steps=args.steps, train_batch_size=args.batch,
                        seed=train_seed, prior_loss_weight=args.prior_loss_weight,
                        lr_scheduler=args.lr_scheduler)  # fmt: skip
    out = work / f"seed{train_seed}"
    argv = train_network_argv(args.model, args.tokenizers, work / "concept", out, run)
    earlier = [step for step in args.score_steps if step < args.steps]
    if earlier:
        argv.append(f"--save_every_n_steps={math.gcd(*earlier)}")
    final = out / "concept.safetensors"
    kept = set(_checkpoints(out)) | ({args.steps} if final.exists() else set())
    seconds = 0.0  # not trained in this run
    if not (args.reuse and kept.issuperset(args.score_steps)):
        seconds = _cpu_run(train_network.main, argv)
    files = _checkpoints(out) | {args.steps: final}
    hits = {step: hits_of(with_trained(base, files[step], False)) for step in args.score_steps}
    return Scored(train_seed, hits, seconds)


def _rate(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


def row(label: str, step: str, hits: dict[str, list[bool]], base: dict[str, list[bool]] | None, args) -> str:
    """A table row: rates, the priors' paired changes against the base, and the verdict."""
    cells = [label, step, f"{_rate(hits['concept']):.2f}"]
    for name in ("class_prior", "other_prior"):
        change, error = paired_change(hits[name], base[name]) if base is not None else (None, None)
        cells += [f"{_rate(hits[name]):.3f}", "-" if base is None else f"{100 * change:+.1f} ({100 * error:.1f})"]
    met = base is not None and meets_bars(hits, base, args.concept_bar, args.prior_points)
    cells.append("-" if base is None else "met" if met else "not met")
    return "| " + " | ".join(cells) + " |"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the toy model's single file")
    parser.add_argument("--tokenizers", required=True, help="its --tokenizer_cache_dir")
    parser.add_argument("--work_dir", help="keep the concept set and trained files here (default: a temporary folder)")
    parser.add_argument("--concept", default="purple triangle", help="a held-out colour and shape")
    parser.add_argument("--token", default="sks")
    parser.add_argument("--images", type=int, default=6, help="instance images")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--reg_per_colour", type=int, default=4, help="class images per known colour")
    parser.add_argument(
        "--other_reg_per_combination", type=int, default=1,
        help="captioned images of each other-shape pretraining combination in a second reg folder (0: none)",
    )  # fmt: skip
    parser.add_argument("--world_seed", type=int, default=0, help="the model's pretraining seed (split, noise)")
    parser.add_argument(
        "--train_seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="kohya's --seed, one run each"
    )
    parser.add_argument("--prior_loss_weight", type=float, default=4.0)
    parser.add_argument("--lr_scheduler", default="cosine")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=600, help="kohya's --max_train_steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--score_steps", type=int, nargs="+", default=[500, 600], help="checkpoints to score")
    parser.add_argument("--concept_samples", type=int, default=64)
    parser.add_argument("--class_samples", type=int, default=8, help="samples per known class colour")
    parser.add_argument("--other_samples", type=int, default=4, help="samples per other-shape pretraining prompt")
    parser.add_argument("--sample_steps", type=int, default=20, help="Euler steps per sample (the bench's 20)")
    parser.add_argument("--concept_bar", type=float, default=0.8)
    parser.add_argument("--prior_points", type=float, default=5.0, help="the most a prior may fall, in points")
    parser.add_argument(
        "--reuse", action="store_true",
        help="score the runs already in --work_dir (trained with the same flags) instead of training them again",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (processes, one thread each)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    late = [step for step in args.score_steps if not 0 < step <= args.steps]
    if late:
        parser.error(f"--score_steps {late[0]} is not a step of the run (1 to --steps {args.steps})")
    args.score_steps = sorted(set(args.score_steps))
    return args


def main(argv: list[str] | None = None) -> dict[int | None, Scored]:
    args = parse_args(argv)
    concept = _concept(args)  # write_concept_set checks it against the world before anything loads
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        write_concept_set(work / "concept", concept, args.images, args.repeats, args.reg_per_colour,
                          args.world_seed, args.other_reg_per_combination, reuse=True)  # fmt: skip
        print(
            f"LoRA r4 '{args.concept}' as '{args.token}': --prior_loss_weight {args.prior_loss_weight:g} "
            f"--lr_scheduler {args.lr_scheduler} --learning_rate {args.learning_rate:g} --max_train_steps "
            f"{args.steps}, other-shape reg {args.other_reg_per_combination}; samples: concept "
            f"{args.concept_samples}, class {args.class_samples} per colour, other {args.other_samples} per prompt"
        )
        print(
            "| train seed | step | concept | class prior | class - base (SE), points | other prior "
            "| other - base (SE), points | bars |\n|---|---|---|---|---|---|---|---|",
            flush=True,
        )
        results: dict[int | None, Scored] = {}
        for scored in _in_workers(partial(score_seed, args, work), [None, *args.train_seeds], args.jobs):
            results[scored.train_seed] = scored
            if scored.train_seed is None:
                print(row("base model", "-", scored.hits[0], None, args), flush=True)
                continue
            for step in args.score_steps:
                print(row(str(scored.train_seed), str(step), scored.hits[step], results[None].hits[0], args),
                      flush=True)  # fmt: skip
        base = results[None].hits[0]
        for step in args.score_steps:
            met = [s for s in args.train_seeds if meets_bars(results[s].hits[step], base, args.concept_bar,
                                                              args.prior_points)]  # fmt: skip
            mean = sum(paired_change(results[s].hits[step]["other_prior"], base["other_prior"])[0]
                       for s in args.train_seeds) / len(args.train_seeds)  # fmt: skip
            print(f"step {step}: all bars met at {len(met)} of {len(args.train_seeds)} training seeds; "
                  f"other prior - base, mean {100 * mean:+.1f} points")  # fmt: skip
        cpu = [results[s].train_cpu_seconds for s in args.train_seeds]
        print(f"training CPU s per run: {', '.join(f'{c:.0f}' if c else 'reused' for c in cpu)}")
    return results


if __name__ == "__main__":
    main()
