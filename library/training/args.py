"""kohya's command-line flags, ``--config_file`` toml handling and argument checks.

Every flag of kohya's train_network.py (v0.10.1) parses, with kohya's names, types and defaults
(including odd ones such as ``--learning_rate 2e-6`` and ``--caption_extension .caption``), so
existing command lines and config files work unchanged. Flags this suite cannot honour are
refused when set instead of silently ignored; ``--config_file`` handling is in config_file.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from library.cli import apply_console_log_flags
from library.data.dataset_schema import parse_resolution  # one rule for --resolution and dataset configs
from library.errors import ConfigError
from library.training.config_file import read_config_file, write_config_file
from library.training.refused_flags import add_unsupported_args, refuse_unsupported

# kohya's --metadata_* flags, each written as modelspec.<name>.
METADATA_FIELDS = (
    "title", "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from", "trigger_phrase",
    "preprocessor", "is_negative_embedding",
)  # fmt: skip


def int_or_float(value: str) -> int | float:
    """kohya's step-or-ratio values: ``500`` steps, ``0.1`` or ``10%`` of the training steps."""
    if value.endswith("%"):
        return float(value[:-1]) / 100
    number = float(value)
    return int(number) if number >= 1 and number.is_integer() else number


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, help="diffusers folder or .safetensors/.ckpt file")
    g.add_argument("--v2", action="store_true", help="SD2.x model (detected from single files)")
    g.add_argument("--v_parameterization", action="store_true", help="v-prediction model (SD2.x 768-v)")
    g.add_argument("--tokenizer_cache_dir", type=str, help="folder holding the CLIP tokenizer (kohya layout)")
    g.add_argument("--vae", type=str, help="replace the VAE: diffusers folder or single file")
    g.add_argument("--clip_skip", type=int, help="use the output of the n-th last text encoder layer")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under mixed precision")
    g.add_argument(
        "--lowram",
        action="store_true",
        help="load the models straight onto the GPU, tensor by tensor, to spare host RAM (kohya's)",
    )
    g.add_argument(
        "--highvram",
        action="store_true",
        help="keep the VAE and text encoders on the GPU after caching instead of freeing them (kohya's)",
    )
    g.add_argument(
        "--disable_mmap_load_safetensors",
        action="store_true",
        help="read .safetensors files into memory instead of mapping them (kohya's; for network drives)",
    )


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dataset")
    g.add_argument("--train_data_dir", type=str, help="parent of DreamBooth 'N_class' folders, or --in_json images")
    g.add_argument("--reg_data_dir", type=str, help="parent of regularization 'N_class' folders")
    g.add_argument("--in_json", type=str, help="fine-tuning metadata json")
    g.add_argument("--dataset_repeats", type=int, default=1, help="repeats of the --in_json dataset")
    g.add_argument("--dataset_config", type=Path, help="dataset toml/json (kohya's [general]/[[datasets]] schema)")
    g.add_argument("--resolution", type=str, help="'512' or 'width,height'")
    g.add_argument("--enable_bucket", action="store_true", help="aspect-ratio bucketing")
    g.add_argument("--min_bucket_reso", type=int, default=256)
    g.add_argument("--max_bucket_reso", type=int, default=1024)
    g.add_argument("--bucket_reso_steps", type=int, default=64)
    g.add_argument("--bucket_no_upscale", action="store_true")
    g.add_argument("--caption_extension", type=str, default=".caption")
    g.add_argument("--caption_extention", type=str, help="kohya's misspelled alias of --caption_extension")
    g.add_argument("--shuffle_caption", action="store_true")
    g.add_argument("--caption_separator", type=str, default=",")
    g.add_argument("--keep_tokens", type=int, default=0)
    g.add_argument("--keep_tokens_separator", type=str, default="")
    g.add_argument("--secondary_separator", type=str)
    g.add_argument("--enable_wildcard", action="store_true")
    g.add_argument("--caption_prefix", type=str)
    g.add_argument("--caption_suffix", type=str)
    g.add_argument("--caption_dropout_rate", type=float, default=0.0)
    g.add_argument("--caption_dropout_every_n_epochs", type=int, default=0)
    g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0)
    g.add_argument("--token_warmup_min", type=int, default=1)
    g.add_argument("--token_warmup_step", type=float, default=0)
    g.add_argument("--color_aug", action="store_true")
    g.add_argument("--flip_aug", action="store_true")
    g.add_argument("--random_crop", action="store_true")
    g.add_argument("--face_crop_aug_range", type=str)
    g.add_argument(
        "--resize_interpolation",
        choices=["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"],
        help="image resizing (default: area when shrinking, lanczos when enlarging)",
    )
    g.add_argument("--alpha_mask", action="store_true", help="weight the loss by the images' alpha channel")
    g.add_argument(
        "--masked_loss",
        action="store_true",
        help="weight the loss by mask images (conditioning_data_dir in --dataset_config subsets) or alpha masks",
    )
    g.add_argument(
        "--weighted_captions", action="store_true", help="(word:1.3), (word) and [word] weight caption tokens"
    )
    g.add_argument("--cache_info", action="store_true", help="keep image sizes and captions in metadata_cache.json")
    g.add_argument("--cache_latents", action="store_true", help="VAE-encode once and keep in memory")
    g.add_argument("--cache_latents_to_disk", action="store_true", help="also keep .npz files beside the images")
    g.add_argument(
        "--cache_text_encoder_outputs",
        action="store_true",
        help="encode every caption once, up front, and free the text encoder (needs --network_train_unet_only)",
    )
    g.add_argument(
        "--cache_text_encoder_outputs_to_disk",
        action="store_true",
        help="also keep them in <image>_te_outputs.npz (implies --cache_text_encoder_outputs)",
    )
    g.add_argument(
        "--skip_cache_check", action="store_true", help="accepted; caches are checked from headers, cheaply"
    )
    g.add_argument("--vae_batch_size", type=int, default=1)
    g.add_argument("--max_data_loader_n_workers", type=int, default=8)
    g.add_argument("--persistent_data_loader_workers", action="store_true")
    g.add_argument("--max_token_length", type=int, choices=[75, 150, 225])
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--debug_dataset", action="store_true", help="print batches and stop")
    g.add_argument("--validation_split", type=float, default=0.0, help="share of DreamBooth images held out")
    g.add_argument("--validation_seed", type=int, help="seed of the split and of validation noise")
    g.add_argument("--validate_every_n_steps", type=int)
    g.add_argument("--validate_every_n_epochs", type=int)
    g.add_argument("--max_validation_steps", type=int, help="at most this many validation batches")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", type=str)
    g.add_argument("--output_name", type=str)
    g.add_argument("--save_model_as", choices=["safetensors", "ckpt", "pt"], default="safetensors")
    g.add_argument("--save_precision", choices=["float", "fp16", "bf16"])
    g.add_argument("--save_every_n_epochs", type=int)
    g.add_argument("--save_every_n_steps", type=int)
    g.add_argument("--save_n_epoch_ratio", type=int)
    g.add_argument("--save_last_n_epochs", type=int)
    g.add_argument("--save_last_n_steps", type=int)
    g.add_argument("--save_last_n_epochs_state", type=int)
    g.add_argument("--save_last_n_steps_state", type=int)
    g.add_argument("--save_state", action="store_true", help="save optimizer/scheduler/RNG state with each save")
    g.add_argument("--save_state_on_train_end", action="store_true")
    g.add_argument("--resume", type=str, help="state folder written by --save_state")
    g.add_argument("--train_batch_size", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=1600)
    g.add_argument("--max_train_epochs", type=int)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--full_fp16", action="store_true")
    g.add_argument("--full_bf16", action="store_true")
    g.add_argument("--seed", type=int)
    g.add_argument("--xformers", action="store_true")
    g.add_argument("--sdpa", action="store_true", help="scaled-dot-product attention (the default here)")
    g.add_argument("--mem_eff_attn", action="store_true")
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the UNet (accelerate's dynamo)")
    g.add_argument("--dynamo_backend", type=str, default="inductor", help="backend of --torch_compile: inductor, ...")
    g.add_argument("--ddp_timeout", type=int, help="minutes; multi-process only")
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true", help="accepted; no effect (no DDP wrapper)")
    g.add_argument("--ddp_static_graph", action="store_true", help="accepted; no effect (no DDP wrapper)")
    g.add_argument("--initial_epoch", type=int, help="epoch number to start counting at (1 = first)")
    g.add_argument("--initial_step", type=int, help="step number to start counting at; overrides --initial_epoch")
    g.add_argument("--skip_until_initial_step", action="store_true", help="skip the batches before --initial_step")
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--training_comment", type=str)
    g.add_argument("--no_metadata", action="store_true")
    for name in METADATA_FIELDS:
        g.add_argument(f"--metadata_{name}", type=str, help=f"modelspec.{name}")


def add_noise_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("noise and loss")
    g.add_argument("--noise_offset", type=float)
    g.add_argument("--noise_offset_random_strength", action="store_true")
    g.add_argument("--adaptive_noise_scale", type=float)
    g.add_argument("--multires_noise_iterations", type=int)
    g.add_argument("--multires_noise_discount", type=float, default=0.3)
    g.add_argument("--ip_noise_gamma", type=float)
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true")
    g.add_argument("--min_snr_gamma", type=float)
    g.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true")
    g.add_argument("--v_pred_like_loss", type=float)
    g.add_argument("--debiased_estimation_loss", action="store_true")
    g.add_argument("--zero_terminal_snr", action="store_true")
    g.add_argument("--min_timestep", type=int)
    g.add_argument("--max_timestep", type=int)
    g.add_argument("--loss_type", choices=["l1", "l2", "huber", "smooth_l1"], default="l2")
    g.add_argument("--huber_schedule", choices=["constant", "exponential", "snr"], default="snr")
    g.add_argument("--huber_c", type=float, default=0.1)
    g.add_argument("--huber_scale", type=float, default=1.0)


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer_type", type=str, default="", help="AdamW (default), AdamW8bit, Lion, Adafactor, ...")
    g.add_argument("--optimizer_args", type=str, nargs="*", help="key=value, values parsed as Python literals")
    g.add_argument("--use_8bit_adam", action="store_true", help="legacy alias of --optimizer_type AdamW8bit")
    g.add_argument("--use_lion_optimizer", action="store_true", help="legacy alias of --optimizer_type Lion")
    g.add_argument("--learning_rate", type=float, default=2.0e-6)
    g.add_argument("--lr_scheduler", type=str, default="constant")
    g.add_argument("--lr_warmup_steps", type=int_or_float, default=0)
    g.add_argument("--lr_decay_steps", type=int_or_float, default=0)
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1)
    g.add_argument("--lr_scheduler_power", type=float, default=1.0)
    g.add_argument("--lr_scheduler_min_lr_ratio", type=float)
    g.add_argument("--lr_scheduler_timescale", type=int, help="inverse_sqrt's timescale (default: warmup steps)")
    g.add_argument("--lr_scheduler_type", type=str, default="", help="any torch scheduler class, dotted path")
    g.add_argument("--lr_scheduler_args", type=str, nargs="*")


def add_network_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network")
    g.add_argument("--network_module", type=str, help="e.g. networks.lora, networks.lilora, networks.lowrank_ffn")
    g.add_argument("--network_dim", type=int)
    g.add_argument("--network_alpha", type=float, default=1)
    g.add_argument("--network_dropout", type=float)
    g.add_argument("--network_args", type=str, nargs="*", help="key=value pairs for the network module")
    g.add_argument("--network_weights", type=str, help="start from these weights")
    g.add_argument("--dim_from_weights", action="store_true")
    g.add_argument("--network_train_unet_only", action="store_true")
    g.add_argument("--network_train_text_encoder_only", action="store_true")
    g.add_argument("--unet_lr", type=float)
    g.add_argument("--text_encoder_lr", type=float, nargs="*")
    g.add_argument("--scale_weight_norms", type=float)
    g.add_argument("--base_weights", type=str, nargs="*")
    g.add_argument("--base_weights_multiplier", type=float, nargs="*")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sample images")
    g.add_argument("--sample_prompts", type=str, help=".txt (kohya prompt lines), .toml or .json")
    g.add_argument("--sample_every_n_steps", type=int)
    g.add_argument("--sample_every_n_epochs", type=int)
    g.add_argument("--sample_at_first", action="store_true")
    g.add_argument("--sample_sampler", type=str, default="ddim")


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--logging_dir", type=str, help="TensorBoard folder")
    g.add_argument("--log_with", choices=["tensorboard", "wandb", "all"])
    g.add_argument("--log_prefix", type=str)
    g.add_argument("--log_tracker_name", type=str, help="project name in the trackers (default network_train)")
    g.add_argument("--log_tracker_config", type=str, help="toml of tracker init arguments, e.g. [wandb] entity")
    g.add_argument("--log_config", action="store_true", help="log the arguments to the tracker")
    g.add_argument("--wandb_run_name", type=str, help="wandb run name")
    g.add_argument(
        "--wandb_api_key", type=str, help="log in to wandb with this key (never written by --output_config)"
    )
    g.add_argument("--console_log_level", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    g.add_argument("--console_log_file", type=str, help="also write the log to this file")
    g.add_argument("--console_log_simple", action="store_true", help="accepted; the console log is always plain")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("config files")
    g.add_argument("--config_file", type=str, help="toml of these flags (CLI flags override it)")
    g.add_argument("--output_config", action="store_true", help="write non-default flags to --config_file, exit")


# The flag groups of kohya's SD1.x/SD2.x training scripts, in kohya's order.
TRAINING_FLAG_GROUPS = (
    add_model_args,
    add_dataset_args,
    add_training_args,
    add_noise_args,
    add_optimizer_args,
    add_network_args,
    add_sampling_args,
    add_logging_args,
    add_config_args,
    add_unsupported_args,
)


def train_network_parser() -> argparse.ArgumentParser:
    """kohya's train_network.py flags (SD1.x/SD2.x)."""
    parser = argparse.ArgumentParser(
        prog="train_network.py", description="Train a LoRA-style network on SD1.x/SD2.x", allow_abbrev=False
    )
    for add in TRAINING_FLAG_GROUPS:
        add(parser)
    return parser


def parse_or_write_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | None:
    """Parse a training script's flags; with ``--output_config``, write them to --config_file instead (None)."""
    args = parse_args(parser, argv)
    apply_console_log_flags(args.console_log_level, args.console_log_file)
    if not args.output_config:
        return args
    if not args.config_file:
        parser.error("--output_config needs --config_file PATH to write to")
    print(f"wrote {write_config_file(args, parser, args.config_file)}")
    return None


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with kohya's precedence: command line > ``--config_file`` > defaults."""
    args = parser.parse_args(argv)
    if args.config_file and not args.output_config:
        file_argv = read_config_file(args.config_file, parser)
        args = parser.parse_args(file_argv + list(sys.argv[1:] if argv is None else argv))
    refuse_unsupported(args, parser)
    return args


def parse_key_values(pairs: list[str] | None, flag: str) -> dict[str, str]:
    """kohya's ``key=value`` lists (``--network_args``): split on the first '='; values stay strings."""
    result = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag}: expected key=value, got {pair!r}")
        result[key.strip()] = value.strip()
    return result


def verify_training_args(
    args: argparse.Namespace, reso_step_multiple: int = 64, family_name: str = "SD1.x/SD2.x"
) -> None:
    """Normalise kohya's flag interactions and refuse impossible combinations before anything runs.

    Buckets must be multiples of 64 px for SD1.x/SD2.x and of 32 px for SDXL (kohya's checks).
    """
    if args.caption_extention is not None:
        args.caption_extension = args.caption_extention
    if args.cache_latents_to_disk:
        args.cache_latents = True
    if args.use_8bit_adam:
        args.optimizer_type = "AdamW8bit"
    if args.use_lion_optimizer:
        args.optimizer_type = "Lion"
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            setattr(args, name, None)
    args.resolution = parse_resolution(args.resolution)
    verify_text_encoder_cache_args(args)
    checks = [
        (args.pretrained_model_name_or_path is None, "--pretrained_model_name_or_path is required"),
        (args.output_dir is None and not args.debug_dataset, "--output_dir is required"),
        (
            args.cache_latents and (args.color_aug or args.random_crop),
            "--color_aug/--random_crop change images each epoch and cannot be used with --cache_latents",
        ),
        (args.full_fp16 and args.mixed_precision != "fp16", "--full_fp16 needs --mixed_precision fp16"),
        (args.full_bf16 and args.mixed_precision != "bf16", "--full_bf16 needs --mixed_precision bf16"),
        (
            args.adaptive_noise_scale is not None and args.noise_offset is None,
            "--adaptive_noise_scale needs --noise_offset",
        ),
        (
            args.scale_v_pred_loss_like_noise_pred and not args.v_parameterization,
            "--scale_v_pred_loss_like_noise_pred needs --v_parameterization",
        ),
        (args.v_pred_like_loss is not None and args.v_parameterization, "--v_pred_like_loss is for epsilon models"),
        (
            args.network_train_unet_only and args.network_train_text_encoder_only,
            "--network_train_unet_only and --network_train_text_encoder_only exclude each other",
        ),
        (
            bool(args.metadata_thumbnail)
            and not args.metadata_thumbnail.startswith("data:")
            and not Path(args.metadata_thumbnail).is_file(),
            f"--metadata_thumbnail '{args.metadata_thumbnail}' is neither a data: URL nor an image file",
        ),
        (
            args.bucket_reso_steps % reso_step_multiple != 0,
            f"--bucket_reso_steps must be a multiple of {reso_step_multiple} for {family_name}",
        ),
        (args.gradient_accumulation_steps < 1, "--gradient_accumulation_steps must be >= 1"),
        (
            args.min_timestep is not None and args.max_timestep is not None and args.min_timestep >= args.max_timestep,
            "--min_timestep must be below --max_timestep",
        ),
    ]
    for failed, message in checks:
        if failed:
            raise ConfigError(message)
    verify_logging_and_compile_args(args)


def verify_text_encoder_cache_args(args: argparse.Namespace) -> None:
    """--cache_text_encoder_outputs[_to_disk]: captions fixed for the run and no text encoder trained."""
    if getattr(args, "cache_text_encoder_outputs_to_disk", False):
        args.cache_text_encoder_outputs = True
    if not getattr(args, "cache_text_encoder_outputs", False):
        return
    if not args.network_train_unet_only:
        raise ConfigError(
            "--cache_text_encoder_outputs needs --network_train_unet_only: cached outputs cannot train text encoders"
        )
    if args.weighted_captions:
        raise ConfigError("--cache_text_encoder_outputs cannot be used with --weighted_captions")


def verify_logging_and_compile_args(args: argparse.Namespace) -> None:
    """--torch_compile's backend, wandb, --log_tracker_config and the initial step, before any model loads."""
    import importlib.util

    from accelerate.utils import DynamoBackend

    if args.torch_compile and args.dynamo_backend.upper() not in DynamoBackend.__members__:
        names = ", ".join(b.lower() for b in DynamoBackend.__members__ if b != "NO")
        raise ConfigError(f"--dynamo_backend '{args.dynamo_backend}' is not one of accelerate's: {names}")
    if args.log_with in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"--log_with {args.log_with} needs the wandb package (pip install wandb)")
    if args.log_tracker_config and not Path(args.log_tracker_config).is_file():
        raise ConfigError(f"--log_tracker_config '{args.log_tracker_config}' does not exist")
    if args.initial_step is not None and args.initial_step < 0:
        raise ConfigError("--initial_step must be >= 0")
    if args.initial_epoch is not None and args.initial_epoch < 1:
        raise ConfigError("--initial_epoch counts from 1")
