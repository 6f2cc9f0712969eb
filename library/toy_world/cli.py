"""The command lines of tools/make_toy_world.py and tools/pretrain_toy_world.py."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from library.errors import ConfigError
from library.models.stable_diffusion import save_diffusers_folder, save_ldm_checkpoint
from library.toy_world.concept import Concept, write_concept_set
from library.toy_world.evaluate import reconstruction_report, sample_report
from library.toy_world.generator import COLOURS, SHAPES, combination_split, write_dataset
from library.toy_world.model import VAE_CHANNELS, build_toy_model, tokenizer_cache_folder, write_toy_tokenizer
from library.toy_world.pretrain import (
    VAE_CONTINUED_IMAGES_FROM,
    VAE_IMAGES_FROM,
    PretrainPlan,
    StageLog,
    normalise_latent_scale,
    pretrain_diffusion,
    pretrain_vae,
)

DATASET_CLASS = "toy"


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out '{out}' exists and is not empty: pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def make_dataset_main(argv: list[str] | None = None) -> Path:
    """Write the toy dataset: ``img/1_toy`` (pretraining combinations), ``held_out/1_toy``, a split file."""
    parser = argparse.ArgumentParser(description="Write toy images and captions (kohya DreamBooth folders).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of every image")
    parser.add_argument("--per_combination", type=int, default=10, help="images per colour/shape combination")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument(
        "--concept",
        help="also write a DreamBooth set in <out>/concept: 'COLOUR SHAPE', a held-out one, e.g. 'purple triangle'",
    )
    parser.add_argument("--concept_token", default="sks", help="the rare token the concept is bound to")
    parser.add_argument("--concept_images", type=int, default=6, help="instance images of the concept")
    parser.add_argument("--concept_repeats", type=int, default=20, help="kohya repeats of the instance folder")
    parser.add_argument("--reg_per_colour", type=int, default=4, help="class images per known colour of the shape")
    args = parser.parse_args(argv)
    for flag in ("per_combination", "concept_images", "concept_repeats", "reg_per_colour"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be 1 or more, got {getattr(args, flag)}")
    concept = None
    if args.concept is not None:
        words = args.concept.split()
        if len(words) != 2:
            raise ConfigError(f"--concept '{args.concept}': give a colour and a shape, e.g. 'purple triangle'")
        concept = Concept(words[0], words[1], args.concept_token)
        concept.check(args.seed)
    out = Path(args.out)
    _prepare_out(out, args.overwrite)
    pretraining, held_out = combination_split(args.seed)
    train = write_dataset(out / "img" / f"1_{DATASET_CLASS}", pretraining, args.per_combination, args.seed)
    first = len(train)
    held = write_dataset(out / "held_out" / f"1_{DATASET_CLASS}", held_out, args.per_combination, args.seed, first)
    split = {"seed": args.seed, "colours": COLOURS, "shapes": SHAPES, "pretraining": pretraining, "held_out": held_out}
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    print(f"{len(train)} pretraining images in {out / 'img'}, {len(held)} held-out images in {out / 'held_out'}")
    if concept is not None:
        instance, reg = write_concept_set(
            out / "concept", concept, args.concept_images, args.concept_repeats, args.reg_per_colour, args.seed
        )
        print(f"concept '{concept.prompt}' ({concept.colour} {concept.shape}): {instance} and class images in {reg}")
    return out


def _plan_args(parser: argparse.ArgumentParser) -> None:
    for spec in fields(PretrainPlan):
        kind = float if spec.type in ("float", "float | None") else int
        parser.add_argument(f"--{spec.name}", type=kind, default=spec.default, help=f"(default {spec.default})")


def pretrain_main(argv: list[str] | None = None) -> Path:
    """Pretrain the toy model and write it as a diffusers folder and a single file, with a report."""
    parser = argparse.ArgumentParser(description="Pretrain the toy SD1-layout model on the toy world.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on the count)")
    parser.add_argument("--vae_from", help="a VAE folder from an earlier run (its out/vae): skip the VAE stage")
    parser.add_argument(
        "--vae_continue_from",
        help="a VAE folder from an earlier run: train it --vae_steps more (a second VAE stage), on new images",
    )
    parser.add_argument(
        "--vae_decoder_only",
        action="store_true",
        help="with --vae_continue_from: train only the decoder, so the latent space (and a UNet on it) stays",
    )
    parser.add_argument(
        "--vae_channels", default=",".join(map(str, VAE_CHANNELS)), help="VAE channels per level, multiples of 32"
    )
    parser.add_argument(
        "--unet_continue_from",
        help="a toy_sd1 folder from an earlier run: its UNet and text encoder train --unet_steps more",
    )
    parser.add_argument("--eval_images", type=int, default=720, help="images for the VAE reconstruction check")
    parser.add_argument("--eval_samples", type=int, default=2, help="samples per combination for the final check")
    parser.add_argument(
        "--save_precision",
        choices=["float", "fp16"],
        default="float",
        help="dtype of the written model (fp16 halves the committed files; the report scores the float model)",
    )
    _plan_args(parser)
    args = parser.parse_args(argv)
    plan = PretrainPlan(**{spec.name: getattr(args, spec.name) for spec in fields(PretrainPlan)})
    vae_channels = _channels(args.vae_channels)
    for flag in ("vae_from", "vae_continue_from"):
        folder = getattr(args, flag)
        if folder and not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"--{flag} '{folder}' is not a VAE folder (no config.json)")
    if args.unet_continue_from:
        for part in ("unet", "text_encoder"):
            if not (Path(args.unet_continue_from) / part / "config.json").is_file():
                raise ConfigError(f"--unet_continue_from '{args.unet_continue_from}' has no {part}/config.json")
    if args.vae_decoder_only and not args.vae_continue_from:
        raise ConfigError("--vae_decoder_only trains a VAE further: give --vae_continue_from")
    if args.vae_from and args.vae_continue_from:
        raise ConfigError("--vae_from skips the VAE stage and --vae_continue_from trains one: give one of them")
    out = Path(args.out)
    _prepare_out(out, args.overwrite)
    torch.set_num_threads(args.threads)
    log_path = out / "pretrain.log"

    def report(line: str) -> None:
        print(line, flush=True)
        with log_path.open("a") as log:
            log.write(line + "\n")

    tokenizer = write_toy_tokenizer(tokenizer_cache_folder(out / "tokenizers"))
    model = build_toy_model(tokenizer, plan.seed, vae_channels)
    summary: dict = {"plan": asdict(plan), "threads": args.threads, "vae_channels": vae_channels}
    pretraining, held_out = combination_split(plan.seed)
    started = time.perf_counter()
    if args.vae_from:
        model.vae = AutoencoderKL.from_pretrained(args.vae_from)
        summary["vae_from"] = args.vae_from
    else:
        if args.vae_continue_from:
            model.vae = AutoencoderKL.from_pretrained(args.vae_continue_from)
            summary["vae_continued_from"] = args.vae_continue_from
        continued = bool(args.vae_continue_from)
        first_image = VAE_CONTINUED_IMAGES_FROM if continued else VAE_IMAGES_FROM
        vae_log = pretrain_vae(
            model.vae, plan, report, continued=continued, first_image=first_image, decoder_only=args.vae_decoder_only
        )
        summary["vae"] = _stage_summary(vae_log)
        if not args.vae_decoder_only:  # the encoder, and so the latent scale, did not change
            summary["vae"]["latent_rescale"] = normalise_latent_scale(model.vae, plan.seed)
        model.vae.save_pretrained(out / "vae")
    if args.eval_images > 0:
        accuracy, psnr = reconstruction_report(model.vae, pretraining + held_out, args.eval_images, plan.seed)
        summary["reconstruction"] = {"psnr_db": psnr, **accuracy.rates(), "confusion": _pairs(accuracy.confusion)}
        report(f"VAE reconstruction: PSNR {psnr:.2f} dB, classifier {accuracy.rates()}")
    if args.unet_continue_from:
        source = Path(args.unet_continue_from)
        model.unet = UNet2DConditionModel.from_pretrained(source / "unet", torch_dtype=torch.float32)
        model.text_encoder = CLIPTextModel.from_pretrained(source / "text_encoder").float()
        summary["unet_continued_from"] = args.unet_continue_from
    if plan.unet_steps > 0:
        unet_log = pretrain_diffusion(model, plan, report, round_index=int(bool(args.unet_continue_from)))
        summary["unet"] = _stage_summary(unet_log)
    if plan.unet_steps > 0 and args.eval_samples > 0:
        for name, combos in (("pretraining", pretraining), ("held_out", held_out)):
            samples = sample_report(model, combos, args.eval_samples, plan.seed)
            summary[f"samples_{name}"] = {**samples.rates(), "confusion": _pairs(samples.confusion)}
            report(f"samples of {name} prompts: {samples.rates()}")
    summary["seconds"] = time.perf_counter() - started
    dtype = torch.float16 if args.save_precision == "fp16" else None
    save_diffusers_folder(model, out / "toy_sd1", dtype)
    save_ldm_checkpoint(model, out / "toy_sd1.safetensors", dtype)
    (out / "pretrain_report.json").write_text(json.dumps(summary, indent=1) + "\n")
    report(f"wrote {out / 'toy_sd1'} and {out / 'toy_sd1.safetensors'} in {summary['seconds']:.0f} s")
    return out


def _channels(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(part) for part in text.split(","))
    except ValueError:
        channels = ()
    if len(channels) != 4 or any(c <= 0 or c % 32 for c in channels):
        raise ConfigError(f"--vae_channels '{text}': give four multiples of 32, e.g. 64,64,64,64")
    return channels


def _stage_summary(log: StageLog) -> dict:
    return {"steps": log.steps, "seconds": log.seconds, "cpu_seconds": log.cpu_seconds, "final_loss": log.losses[-1]}


def _pairs(confusion: dict[tuple[str, str], int]) -> dict[str, int]:
    return {f"{expected}->{read}": n for (expected, read), n in sorted(confusion.items(), key=lambda kv: -kv[1])}
