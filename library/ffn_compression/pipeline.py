"""The stages of ``tools/compress_ffn.py``, each a function of kohya-style args.

calibrate -> init -> blockwise -> theseus (ends with end-to-end fine-tuning) -> export.
Every stage takes train_network.py's flags plus a few of its own, so one ``--config_file`` serves
the whole pipeline; files pass between stages (calibration file, network files, UNet folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed

from library.data.dataset_config import build_blueprints
from library.data.dataset_group import build_dataset_group
from library.distill.cost import count_parameters
from library.errors import ConfigError
from library.ffn_compression.calibration import (
    CALIBRATION_METADATA,
    Calibration,
    FFNRecorder,
    calibrate,
    calibrate_on_dataset,
    calibrate_on_prompts,
    relative_errors,
)
from library.ffn_compression.initialise import INIT_METHODS, initialise_network
from library.ffn_compression.training import DEFAULT_OPTIMIZER, TheseusNetworkTrainer, short_names, train_blockwise
from library.ffn_compression.unet import compress_unet
from library.models.stable_diffusion import StableDiffusionModel, save_diffusers_folder
from library.training.args import parse_args, parse_key_values, train_network_parser, verify_training_args
from library.training.model_setup import SAVE_DTYPES, load_training_model, place_frozen, vae_dtype
from library.training.preflight import check_images, claim_output
from library.training.sampling import load_sample_prompts
from networks import lowrank_ffn
from networks.network_args import parse_network_args

logger = logging.getLogger(__name__)

STAGES = ("calibrate", "init", "blockwise", "theseus", "export")
DEFAULT_THESEUS_SCHEDULE = "linear:0.0006,0.3"  # BERT-of-Theseus' README: p = 1 after ~1167 steps
HELD_OUT_METADATA = "lowrank_ffn_heldout_error"


def compress_ffn_parser() -> argparse.ArgumentParser:
    """train_network.py's flags and the compression flags (the stage comes first, see :func:`parse_stage_args`)."""
    parser = train_network_parser()
    parser.prog = "tools/compress_ffn.py {" + ",".join(STAGES) + "}"
    parser.description = "Compress a UNet's feed-forwards to narrow ones, in stages: " + " -> ".join(STAGES)
    g = parser.add_argument_group("FFN compression")
    g.add_argument("--calib_prompts", type=str, help="kohya prompt file sampled with CFG for calibration")
    g.add_argument("--calib_timesteps", type=int, default=4, help="noise levels per calibration image batch")
    g.add_argument("--calib_max_batches", type=int, help="at most this many image batches (default: one epoch)")
    g.add_argument("--calib_holdout_every", type=int, default=4, help="hold out every n-th prompt/batch (0: none)")
    g.add_argument("--calib_tokens", type=int, default=32768, help="FFN input tokens kept per FFN (fit, held out)")
    g.add_argument("--calib_file", type=str, help="calibration file (calibrate writes it; init and blockwise read it)")
    g.add_argument("--init", choices=INIT_METHODS, default="pca", help="how init chooses the kept hidden units")
    g.add_argument("--token_batch_size", type=int, default=1024, help="blockwise: tokens per FFN per step")
    g.add_argument(
        "--theseus_schedule", default=DEFAULT_THESEUS_SCHEDULE, help="'constant:P' or 'linear:K,B' (p=min(1,K*t+B))"
    )
    return parser


def parse_stage_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``STAGE --flag ...``. The stage is taken off first: as a positional argument it would be
    swallowed by a list flag such as ``network_args`` coming from ``--config_file``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = compress_ffn_parser()
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0)
    if not argv or argv[0] not in STAGES:
        parser.error(f"the first argument must be the stage: one of {', '.join(STAGES)}")
    args = parse_args(parser, argv[1:])
    args.stage = argv[0]
    return args


def run_stage(args: argparse.Namespace) -> Path:
    """Run ``args.stage``; returns what it wrote."""
    if args.output_config:
        raise ConfigError("--output_config is train_network.py's; write the toml by hand (docs/lowrank_ffn.md)")
    verify_training_args(args)
    if args.seed is not None:
        set_seed(args.seed)  # calibration noise and VAE sampling; the training stages seed as train_network does
    stages = {
        "calibrate": run_calibrate,
        "init": run_init,
        "blockwise": run_blockwise,
        "theseus": run_theseus,
        "export": run_export,
    }
    if args.stage == "theseus":
        return run_theseus(args)  # train_network.py's trainer claims its own output
    # Held like train_network.py's output: a second stage writing the same name is refused, and a
    # killed stage's temporary files are removed at the next start.
    with claim_output(args, stage_output_name(args)):
        return stages[args.stage](args)


def stage_output_name(args: argparse.Namespace) -> str:
    """The name a stage writes under when ``--output_name`` is not given."""
    names = {"calibrate": "ffn", "init": f"ffn_{args.init}", "blockwise": "blockwise", "export": "compressed"}
    return names[args.stage]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_model(args: argparse.Namespace) -> StableDiffusionModel:
    """train_network.py's model (``--vae``, ``--zero_terminal_snr``, ...), frozen on the device."""
    model = load_training_model(args)
    place_frozen(args, _device(), model.unet, model.text_encoder)
    model.vae.to(_device(), vae_dtype(args))
    return model


def _network_kwargs(args: argparse.Namespace) -> dict[str, str]:
    return parse_key_values(args.network_args, "--network_args")


def _output(args: argparse.Namespace, default_name: str, suffix: str = ".safetensors") -> Path:
    return Path(args.output_dir) / f"{args.output_name or default_name}{suffix}"


def _calibration(args: argparse.Namespace) -> Calibration:
    if not args.calib_file:
        raise ConfigError(f"{args.stage} needs --calib_file (written by the calibrate stage)")
    if not Path(args.calib_file).is_file():
        raise ConfigError(f"--calib_file '{args.calib_file}' does not exist")
    return Calibration.load(args.calib_file)


def _require_network_weights(args: argparse.Namespace) -> None:
    if not args.network_weights:
        raise ConfigError(f"{args.stage} needs --network_weights (a file written by init, blockwise or theseus)")


def _network_from_weights(args: argparse.Namespace, model: StableDiffusionModel) -> lowrank_ffn.LowRankFFNNetwork:
    network, weights = lowrank_ffn.create_network_from_weights(1.0, args.network_weights, None, None, model.unet)
    network.load_weights(args.network_weights)
    return network


def log_errors(network: lowrank_ffn.LowRankFFNNetwork, columns: dict[str, dict[str, float]]) -> None:
    """One line per FFN: block, width, and each column of held-out relative errors."""
    names = short_names(network.ffn_modules)
    logger.info("%-8s %6s " + " ".join(f"{title:>10}" for title in columns), "block", "width")
    for module in network.ffn_modules:
        values = " ".join(f"{errors.get(module.lora_name, float('nan')):>10.4f}" for errors in columns.values())
        logger.info("%-8s %6d %s", names[module.lora_name], module.hidden_width, values)


def run_calibrate(args: argparse.Namespace) -> Path:
    """Run the original UNet on prompts and/or images; write the calibration file."""
    blocks = parse_network_args(lowrank_ffn.LowRankFFNArgs, _network_kwargs(args)).blocks
    prompts = load_sample_prompts(args.calib_prompts) if args.calib_prompts else []
    has_images = bool(args.train_data_dir or args.dataset_config or args.in_json)
    if not prompts and not has_images:
        raise ConfigError("calibrate needs --calib_prompts and/or images (--train_data_dir or --dataset_config)")
    blueprints = build_blueprints(args) if has_images else None
    if blueprints:
        check_images(blueprints, skip_cached=False)  # a broken image is one line before the model loads
    out = Path(args.calib_file) if args.calib_file else _output(args, "ffn", "-calibration.safetensors")
    seed = args.seed or 0
    model = _load_model(args)
    targets = lowrank_ffn.select_targets(model.unet, blocks)
    group = None
    if blueprints:
        group = build_dataset_group(blueprints, model.tokenizer, max_token_length=args.max_token_length, seed=seed)

    def run_sources(recorder: FFNRecorder) -> dict:
        info = {"timesteps": args.calib_timesteps, "holdout_every": args.calib_holdout_every}
        common = {"holdout_every": args.calib_holdout_every, "clip_skip": args.clip_skip, "seed": seed}
        if prompts:
            sampler = args.sample_sampler
            info["prompts"] = calibrate_on_prompts(model, prompts, recorder, default_sampler=sampler, **common)
        if group is not None:
            info["image_batches"] = calibrate_on_dataset(
                model, group, recorder, timesteps=args.calib_timesteps, max_batches=args.calib_max_batches, **common
            )
        return info

    ffns = {t.name: t.module for t in targets}
    calibration = calibrate(model, ffns, run_sources=run_sources, tokens=args.calib_tokens, seed=seed)
    calibration.save(out)
    for name, stats in calibration.stats.items():
        held_out = len(calibration.heldout.get(name, ()))
        logger.info("%s: %d fit tokens in the statistics, %d held-out tokens kept", name, stats.count, held_out)
    logger.info("wrote %s", out)
    return out


def run_init(args: argparse.Namespace) -> Path:
    """Narrow FFNs initialised from the calibration (``--init pca|prune``); reports held-out errors."""
    calibration = _calibration(args)
    model = _load_model(args)
    network = lowrank_ffn.create_network(1.0, args.network_dim, None, None, None, model.unet, **_network_kwargs(args))
    initialise_network(network, calibration.stats, args.init)
    errors = relative_errors(network, calibration.heldout)
    log_errors(network, {"held-out": errors})
    out = _output(args, f"ffn_{args.init}")
    metadata = {HELD_OUT_METADATA: json.dumps(errors), CALIBRATION_METADATA: json.dumps(calibration.info)}
    network.save_weights(out, SAVE_DTYPES[args.save_precision], metadata)
    logger.info("wrote %s", out)
    return out


def run_blockwise(args: argparse.Namespace) -> Path:
    """Train each narrow FFN to match its original on the cached tokens (Adafactor unless told otherwise)."""
    _require_network_weights(args)
    calibration = _calibration(args)
    model = _load_model(args)
    network = _network_from_weights(args, model)
    args.optimizer_type = args.optimizer_type or DEFAULT_OPTIMIZER
    before = relative_errors(network, calibration.heldout)
    metadata = {"lowrank_ffn_stage": "blockwise", CALIBRATION_METADATA: json.dumps(calibration.info)}
    train_blockwise(args, model.unet, network, calibration, metadata, SAVE_DTYPES[args.save_precision])
    log_errors(network, {"before": before, "after": relative_errors(network, calibration.heldout)})
    return _output(args, "blockwise", f".{args.save_model_as}")


def run_theseus(args: argparse.Namespace) -> Path:
    """train_network.py on narrow FFNs from --network_weights, swapped in by --theseus_schedule."""
    _require_network_weights(args)
    args.network_module = args.network_module or "networks.lowrank_ffn"
    args.dim_from_weights = True
    TheseusNetworkTrainer(args).train()
    return _output(args, "last", f".{args.save_model_as}")


def run_export(args: argparse.Namespace) -> Path:
    """Write the model with the narrow FFNs built in, as a diffusers folder (``load_compressed_unet`` reads it)."""
    _require_network_weights(args)
    out = _output(args, "compressed", "")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export: '{out}' already exists; pick another --output_name or remove it")
    model = load_training_model(args)
    network = _network_from_weights(args, model)
    original = count_parameters(model.unet)
    compress_unet(model.unet, network)
    save_diffusers_folder(model, out, SAVE_DTYPES[args.save_precision])
    compressed = count_parameters(model.unet)
    logger.info("UNet parameters %d -> %d (%.3f); wrote %s", original, compressed, compressed / original, out)
    return out
