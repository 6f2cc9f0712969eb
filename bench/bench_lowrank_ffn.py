"""Narrow FFNs against the original UNet: held-out FFN error per init and width, parameters, MACs, CPU latency.

    python -m bench.bench_lowrank_ffn                        # the tiny fixture, then an SD1.5-sized random UNet
    python -m bench.bench_lowrank_ffn --models tiny
    python -m bench.bench_lowrank_ffn --models sd15 --calib_calls 48 --runs 8 --pixels 768

The article's blocks IN7, IN8, MID, OUT3, OUT4, OUT5 (4C = 5120 hidden units in SD1.5) are narrowed to
``--ratios`` of 4C: 0.1875 is the article's 960; the tiny fixture's FFNs (4C = 256) get the same ratios.

* tiny: calibrated as ``tools/compress_ffn.py calibrate`` does, on the fixture's images (4 timesteps,
  captions and empty captions) and 4 prompts sampled with CFG; every 4th image batch and prompt held out.
* sd15: random weights. Each calibration call runs 4 random latents at ``--calib_pixels`` and one
  timestep of a spread over [0, 1000), under two random 77-token contexts; every 4th call is held
  out. A random model's activations are not a trained model's: its errors compare the methods on
  unstructured activations and say nothing of what a trained SD1.5 would lose.

Error: ``|y - y'|_F / |y|_F`` of each FFN's output over its held-out input tokens (mean and worst of
the 6), before any training. MACs: counted on the meta device, attention included. Latency: batch 1,
77 tokens, fp32, ``torch.inference_mode``; one UNet whose FFNs are swapped per variant, so every
variant shares everything else; warm-up, then the median of the timed forwards, round robin.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import FeedForward

from library.distill.cost import CONTEXT_TOKENS, count_macs, count_parameters
from library.ffn_compression.calibration import (
    Calibration,
    FFNRecorder,
    is_heldout,
    relative_errors,
    spread_timesteps,
)
from library.ffn_compression.initialise import INIT_METHODS, initialise_network, literal_pca_rotation
from library.ffn_compression.pipeline import parse_stage_args, run_stage
from library.ffn_compression.unet import FFN_WIDTHS_KEY, build_compressed_unet
from library.models.sd_configs import SD15_UNET
from library.models.stable_diffusion import load_stable_diffusion
from library.tiny_sd import write_tiny_sd
from networks import lowrank_ffn

BLOCKS = "IN7,IN8,MID,OUT3,OUT4,OUT5"
TINY_PROMPTS = ["sks toy, red, cube", "a blue ball on the table --n painting", "small green cube", "wooden toy"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["tiny", "sd15"], default=["tiny", "sd15"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1875, 0.375, 0.5], help="k / 4C")
    parser.add_argument("--calib_calls", type=int, default=24, help="sd15: calibration UNet calls")
    parser.add_argument("--calib_pixels", type=int, default=256, help="sd15: calibration image size")
    parser.add_argument("--pixels", type=int, default=512, help="sd15: size for MACs and latency (tiny: 64)")
    parser.add_argument("--runs", type=int, default=4, help="timed sd15 forwards per variant (tiny: 25x)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


# ---- models and calibration ---------------------------------------------------------------------


def tiny_model_and_calibration(work: Path):
    """The tiny fixture's SD1 UNet and a calibration of it, through the pipeline's own calibrate stage."""
    tiny = write_tiny_sd(work / "tiny", seed=0)
    lines = [f"{prompt} --w 64 --h 64 --s 10 --d {seed}" for seed, prompt in enumerate(TINY_PROMPTS)]
    (work / "prompts.txt").write_text("\n".join(lines))
    argv = ["calibrate", "--pretrained_model_name_or_path", str(tiny.sd1_dir), "--output_dir", str(work)]
    argv += ["--train_data_dir", str(tiny.train_data_dir), "--caption_extension", ".txt", "--resolution", "64"]
    argv += ["--calib_prompts", str(work / "prompts.txt"), "--network_args", f"blocks={BLOCKS}", "--seed", "0"]
    path = run_stage(parse_stage_args(argv))
    return load_stable_diffusion(tiny.sd1_dir).unet, Calibration.load(path)


@torch.no_grad()
def sd15_model_and_calibration(calls: int, pixels: int):
    """A seeded random SD1.5 UNet and a calibration on random latents and contexts (see the module doc)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)
    targets = lowrank_ffn.select_targets(unet, lowrank_ffn.parse_blocks(BLOCKS))
    generator = torch.Generator().manual_seed(1)
    latent = pixels // 8
    with FFNRecorder({t.name: t.module for t in targets}, tokens=32768) as recorder:
        for index, t in enumerate(spread_timesteps(calls)):
            recorder.heldout = is_heldout(index, 4)
            latents = torch.randn(4, 4, latent, latent, generator=generator)
            contexts = torch.randn(2, CONTEXT_TOKENS, SD15_UNET["cross_attention_dim"], generator=generator)
            unet(latents.repeat(2, 1, 1, 1), torch.full((8,), t), contexts.repeat_interleave(4, dim=0))
    return unet, recorder.result({"calls": calls, "pixels": pixels})


# ---- sizes and latency --------------------------------------------------------------------------


def ffn_paths(unet: UNet2DConditionModel) -> dict[str, int]:
    """{module path: full hidden width} of the benchmarked FFNs."""
    paths = {id(m): p for p, m in unet.named_modules()}
    targets = lowrank_ffn.select_targets(unet, lowrank_ffn.parse_blocks(BLOCKS))
    return {paths[id(t.module)]: t.module.net[2].in_features for t in targets}


def widths_for(unet: UNet2DConditionModel, ratio: float) -> dict[str, int]:
    return {path: max(1, round(ratio * full)) for path, full in ffn_paths(unet).items()}


def swap_ffns(unet: UNet2DConditionModel, modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Put ``modules`` at their paths; returns what was there."""
    previous = {}
    for path, module in modules.items():
        parent, _, child = path.rpartition(".")
        previous[path] = getattr(unet.get_submodule(parent), child)
        setattr(unet.get_submodule(parent), child, module)
    return previous


def timed_forward(unet: UNet2DConditionModel, pixels: int) -> float:
    latent = pixels // 8
    sample = torch.randn(1, unet.config.in_channels, latent, latent)
    context = torch.randn(1, CONTEXT_TOKENS, unet.config.cross_attention_dim)
    with torch.inference_mode():
        start = time.perf_counter()
        unet(sample, torch.tensor([500]), context)
        return time.perf_counter() - start


def size_and_speed(unet: UNet2DConditionModel, ratios: list[float], pixels: int, runs: int) -> dict:
    """{ratio (1.0 = original): (parameters, MACs, seconds per forward)}."""
    variants = {1.0: {}}
    for ratio in ratios:
        variants[ratio] = {
            path: FeedForward(unet.get_submodule(path).net[0].proj.in_features, inner_dim=width).eval()
            for path, width in widths_for(unet, ratio).items()
        }
    times = {ratio: [] for ratio in variants}
    for run in range(runs + 1):
        for ratio, modules in variants.items():
            previous = swap_ffns(unet, modules)
            seconds = timed_forward(unet, pixels)
            swap_ffns(unet, previous)
            if run:  # run 0 warms up
                times[ratio].append(seconds)
    rows = {}
    for ratio in variants:
        config = {**unet.config, FFN_WIDTHS_KEY: widths_for(unet, ratio) if ratio != 1.0 else {}}
        meta = build_compressed_unet({k: v for k, v in config.items() if not k.startswith("_")}, device="meta")
        rows[ratio] = (count_parameters(meta), count_macs(meta, pixels // 8), statistics.median(times[ratio]))
    return rows


# ---- errors -------------------------------------------------------------------------------------


def held_out_errors(unet: UNet2DConditionModel, calibration: Calibration, ratios: list[float]) -> dict:
    """{(method, ratio): (mean, max) held-out relative error of the 6 FFNs}."""
    results, axes_cache = {}, {}
    for ratio in ratios:
        network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, blocks=BLOCKS, ratio=str(ratio))
        for method in INIT_METHODS:
            initialise_network(network, calibration.stats, method, axes_cache=axes_cache)
            errors = list(relative_errors(network, calibration.heldout).values())
            results[(method, ratio)] = (statistics.mean(errors), max(errors))
    return results


@torch.no_grad()
def literal_rotation_errors(unet: UNet2DConditionModel, calibration: Calibration, ratio: float) -> tuple:
    """(mean, max) held-out error of the article's words taken literally: value and gate rows rotated."""
    network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, blocks=BLOCKS, ratio=str(ratio))
    for module in network.ffn_modules:
        proj, out = lowrank_ffn.ffn_layers(module.lora_name, module.original)
        stats = calibration.stats[module.lora_name]
        weights = literal_pca_rotation(stats, proj.weight, proj.bias, out.weight, out.bias, module.hidden_width)
        params = (module.net[0].proj.weight, module.net[0].proj.bias, module.net[2].weight, module.net[2].bias)
        for param, value in zip(params, weights):
            param.copy_(value)
    errors = list(relative_errors(network, calibration.heldout).values())
    return statistics.mean(errors), max(errors)


# ---- report -------------------------------------------------------------------------------------


def print_report(name: str, unet, sizes: dict, errors: dict, literal: tuple | None, pixels: int, ratios) -> None:
    params, macs, seconds = sizes[1.0]
    full = max(ffn_paths(unet).values())
    print(f"\n{name}: FFNs {BLOCKS} (4C = {full}); MACs and latency at {pixels} px, batch 1, fp32 CPU")
    header = f"{'k/4C':>7} {'k':>5} {'params':>13} {'ratio':>6} {'GMACs':>8} {'ratio':>6} {'s/fwd':>8} {'ratio':>6}"
    print(header + "".join(f" {m + ' err':>10} {'(max)':>6}" for m in INIT_METHODS))
    for ratio, (p, m, s) in sizes.items():
        line = f"{ratio:>7.4f} {round(ratio * full):>5} {p:>13,} {p / params:>6.3f} {m / 1e9:>8.3f} {m / macs:>6.3f}"
        line += f" {s:>8.3f} {s / seconds:>6.3f}"
        for method in INIT_METHODS:
            mean, worst = errors.get((method, ratio), (0.0, 0.0))
            line += f" {mean:>10.4f} {worst:>6.3f}"
        print(line)
    if literal is not None:
        print(f"value and gate rows rotated by the PCA basis (literal reading), k/4C = {min(ratios)}: "
              f"error {literal[0]:.4f} (max {literal[1]:.3f})")  # fmt: skip


def progress(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    started = time.perf_counter()
    for name in args.models:
        with tempfile.TemporaryDirectory() as work:
            progress(f"{name}: calibrating", started)
            if name == "tiny":
                unet, calibration = tiny_model_and_calibration(Path(work))
                pixels, runs = 64, 25 * args.runs
            else:
                unet, calibration = sd15_model_and_calibration(args.calib_calls, args.calib_pixels)
                pixels, runs = args.pixels, args.runs
            progress(f"{name}: timing forwards", started)
            sizes = size_and_speed(unet, args.ratios, pixels, runs)
            progress(f"{name}: initialising and measuring held-out errors", started)
            errors = held_out_errors(unet, calibration, args.ratios)
            literal = literal_rotation_errors(unet, calibration, min(args.ratios)) if name == "tiny" else None
            tokens = {n: (s.count, len(calibration.heldout.get(n, ()))) for n, s in calibration.stats.items()}
            print_report(name, unet, sizes, errors, literal, pixels, args.ratios)
            print("calibration tokens per FFN (fit, held out):", sorted(set(tokens.values())))


if __name__ == "__main__":
    main()
