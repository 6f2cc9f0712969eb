"""Building blocks every training script assembles the same way (train_network.py, distill_unet.py).

Model loading with kohya's model flags, network creation from ``--network_module``, latent caching,
optimizer/schedule/loader preparation through accelerate, sample images, validation timesteps and
the run's metadata: each here once, so that the scripts differ only in what a step computes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from library.data.dataset_group import DatasetGroup, make_dataloader
from library.errors import ConfigError
from library.models.stable_diffusion import StableDiffusionModel, load_stable_diffusion, load_vae
from library.models.text_encoding import encode_tokens, tokenize_captions
from library.training.args import parse_key_values
from library.training.loop import Cadence, Schedule, TrainingRun
from library.training.network_protocol import TrainableNetwork, as_trainable_network
from library.training.noise import NoiseOptions, make_training_scheduler
from library.training.optimizers import make_lr_scheduler, make_optimizer
from library.training.sampling import SamplePrompt, generate_samples
from library.training.saving import modelspec_metadata, training_metadata
from networks.lora_file import LoRAFileError
from networks.network_args import NetworkError

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# kohya validates at timesteps evenly spread inside [min_timestep, max_timestep].
NUM_VALIDATION_TIMESTEPS = 4


# ---- inputs -------------------------------------------------------------------------------------


def shared_seed(accelerator: Accelerator, seed: int | None) -> int:
    """The given seed, or one drawn on the main process and shared, so every process plans the same data."""
    if seed is not None:
        return seed
    drawn = [random.SystemRandom().randint(0, 2**31 - 1)]
    broadcast_object_list(drawn)
    return drawn[0]


def load_training_model(args: argparse.Namespace, path: str | None = None) -> StableDiffusionModel:
    """``--pretrained_model_name_or_path`` (or ``path``) with kohya's model flags and training schedule."""
    model = load_stable_diffusion(
        path or args.pretrained_model_name_or_path,
        v2=args.v2 or None,
        v_parameterization=args.v_parameterization or None,
        tokenizer_cache_dir=args.tokenizer_cache_dir,
    )
    model.noise_scheduler = make_training_scheduler(model.v_parameterization, args.zero_terminal_snr)
    if args.vae:
        model.vae = load_vae(args.vae)
    return model


def enable_xformers(*unets: torch.nn.Module) -> None:
    try:
        for unet in unets:
            unet.enable_xformers_memory_efficient_attention()
    except (ImportError, ModuleNotFoundError, ValueError) as err:
        raise ConfigError(f"--xformers: {err}; the default SDPA attention needs no extra package") from err


def print_dataset_preview(group: DatasetGroup, batches: int = 4) -> None:
    """kohya's --debug_dataset, in text: what the first batches of epoch 1 hold."""
    group.set_current_epoch(1)
    for index in range(min(batches, len(group))):
        batch = group[index]
        data = batch["latents"] if "latents" in batch else batch["images"]
        print(f"batch {index}: {tuple(data.shape)} loss weights {batch['loss_weights'].tolist()}")
        for key, caption in zip(batch["image_keys"], batch["captions"]):
            print(f"  {key}: {caption}")


def prepare_latents(args: argparse.Namespace, accelerator: Accelerator, model: StableDiffusionModel, groups) -> None:
    """Cache latents (then the VAE leaves the accelerator), or keep the VAE there for encoding."""
    vae_dtype = torch.float32 if args.no_half_vae else WEIGHT_DTYPES[args.mixed_precision]
    model.vae.to(accelerator.device, dtype=vae_dtype)
    if not args.cache_latents:
        return
    for group in groups:
        if group is None:
            continue
        group.cache_latents(
            model.vae,
            vae_batch_size=args.vae_batch_size,
            to_disk=args.cache_latents_to_disk,
            device=accelerator.device,
            dtype=vae_dtype,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
        )
    model.vae.to("cpu")
    accelerator.wait_for_everyone()


# ---- networks -----------------------------------------------------------------------------------


def import_network_module(name: str):
    """Import ``--network_module`` with the repo root on sys.path (kohya's convention)."""
    if not name:
        raise ConfigError("--network_module is required (e.g. networks.lora)")
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.append(root)
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"--network_module '{name}' cannot be imported: {err}") from err
    for function in ("create_network", "create_network_from_weights"):
        if not hasattr(module, function):
            raise ConfigError(f"--network_module '{name}' has no {function}(); it is not a network module")
    return module


@contextlib.contextmanager
def network_errors_as_config_errors(flag: str) -> Iterator[None]:
    """Our network modules raise ValueErrors of their own (they cannot import library/); name the flag."""
    try:
        yield
    except (NetworkError, LoRAFileError) as err:
        raise ConfigError(f"{flag}: {err}") from err


def create_network(args: argparse.Namespace, module, model: StableDiffusionModel) -> TrainableNetwork:
    """The network ``--network_module`` builds from kohya's network flags (not yet applied)."""
    with network_errors_as_config_errors("--network_args"):
        net_kwargs = parse_key_values(args.network_args, "--network_args")
        if args.dim_from_weights:
            if not args.network_weights:
                raise ConfigError("--dim_from_weights needs --network_weights")
            network, _ = module.create_network_from_weights(
                1, args.network_weights, model.vae, model.text_encoder, model.unet, **net_kwargs
            )
        else:
            network = module.create_network(
                1.0, args.network_dim, args.network_alpha, model.vae, model.text_encoder, model.unet,
                neuron_dropout=args.network_dropout, **net_kwargs,
            )  # fmt: skip
    if network is None:
        raise ConfigError(f"--network_module {args.network_module} built no network from these arguments")
    requested = {
        "ss_network_module": args.network_module,
        "ss_network_dim": str(args.network_dim),
        "ss_network_alpha": str(args.network_alpha),
        "ss_network_args": json.dumps(net_kwargs),  # kohya: the --network_args dict, values as given
    }
    return as_trainable_network(network, args.network_module, requested)


def load_network_weights(args: argparse.Namespace, network: TrainableNetwork) -> None:
    if args.network_weights:
        with network_errors_as_config_errors("--network_weights"):
            info = network.load_weights(args.network_weights)
        logger.info("loaded --network_weights %s: %s", args.network_weights, info)


# ---- optimization -------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What accelerate hands back for the loop, and the figures the metadata needs."""

    optimizer_name: str
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loader: object
    validation_loader: object | None
    schedule: Schedule


def prepare_optimization(
    args: argparse.Namespace,
    accelerator: Accelerator,
    param_groups: list[dict],
    group: DatasetGroup,
    validation: DatasetGroup | None,
) -> Prepared:
    """Optimizer, LR schedule and loaders through accelerate, with kohya's step counting."""
    optimizer_name, optimizer = make_optimizer(args, param_groups)
    loader = make_dataloader(group, args.max_data_loader_n_workers, args.persistent_data_loader_workers)
    # Batches each process sees per epoch once accelerate shards the loader (it pads to even).
    schedule = Schedule.from_args(args, math.ceil(len(loader) / accelerator.num_processes))
    # accelerate steps a prepared scheduler once per process per optimizer step (as kohya counts).
    lr_scheduler = make_lr_scheduler(args, optimizer, schedule.max_train_steps * accelerator.num_processes)
    optimizer, loader, lr_scheduler = accelerator.prepare(optimizer, loader, lr_scheduler)
    validation_loader = accelerator.prepare(make_dataloader(validation)) if validation is not None else None
    group.set_max_train_steps(schedule.max_train_steps)
    return Prepared(optimizer_name, optimizer, lr_scheduler, loader, validation_loader, schedule)


def start_run(
    args: argparse.Namespace,
    accelerator: Accelerator,
    task,
    prepared: Prepared,
    lr_descriptions: list[str],
    extension: str | None = None,
) -> TrainingRun:
    """The loop over ``task`` with kohya's save/sample cadence, resumed from ``--resume`` if given.

    ``extension`` overrides ``--save_model_as`` in checkpoint names ("" names folders).
    """
    cadence = Cadence.from_args(args, default_name="last", num_epochs=prepared.schedule.num_epochs)
    if extension is not None:
        cadence = dataclasses.replace(cadence, extension=extension)
    run = TrainingRun(
        accelerator, task, prepared.loader, prepared.optimizer, prepared.lr_scheduler, prepared.schedule, cadence,
        lr_descriptions, max_grad_norm=args.max_grad_norm, seed=args.seed,
    )  # fmt: skip
    if args.resume:
        run.resume(args.resume)
    return run


def run_metadata(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: StableDiffusionModel,
    network: TrainableNetwork,
    group: DatasetGroup,
    validation: DatasetGroup | None,
    prepared: Prepared,
    started_at: float,
) -> dict[str, str]:
    """kohya's ``ss_*`` and ``modelspec.*`` keys of a network file written by this run."""
    metadata = training_metadata(
        args,
        network_metadata=network.network_metadata(),
        dataset_metadata=group.metadata(
            validation=validation,
            num_processes=accelerator.num_processes,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        ),
        optimizer_name=prepared.optimizer_name,
        base_model_version=model.base_model_version,
        v2=model.v2,
        num_epochs=prepared.schedule.num_epochs,
        num_batches_per_epoch=len(prepared.loader),
        started_at=started_at,
    )
    metadata.update(
        modelspec_metadata(args, v2=model.v2, v_parameterization=model.v_parameterization, started_at=started_at)
    )
    return metadata


# ---- what steps share ---------------------------------------------------------------------------


def encode_captions(model: StableDiffusionModel, input_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    return encode_tokens(model.text_encoder, input_ids.to(model.text_encoder.device), clip_skip=clip_skip)


def validation_timesteps(options: NoiseOptions) -> list[int]:
    bounds = (options.min_timestep, options.max_timestep)
    return torch.linspace(*bounds, NUM_VALIDATION_TIMESTEPS + 2).long()[1:-1].tolist()


def render_samples(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: StableDiffusionModel,
    unet: torch.nn.Module,
    prompts: list[SamplePrompt],
    epoch: int | None,
    step: int,
) -> None:
    """kohya's sample images with ``unet`` (e.g. with a network patched in, or a student)."""
    device = accelerator.device
    vae_place = (model.vae.device, model.vae.dtype)
    model.vae.to(device, torch.float32)
    components = {"vae": model.vae, "text_encoder": model.text_encoder, "tokenizer": model.tokenizer, "unet": unet}

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenize_captions(model.tokenizer, texts, args.max_token_length)
        return encode_captions(model, ids, args.clip_skip).to(unet.dtype)

    try:
        generate_samples(
            components,
            prompts,
            encode,
            default_sampler=args.sample_sampler,
            v_parameterization=model.v_parameterization,
            out_dir=Path(args.output_dir) / "sample",
            output_name=args.output_name,
            epoch=epoch,
            step=step,
            device=device,
        )
    finally:
        model.vae.to(*vae_place)
