"""LoRA-style network training (``train_network.py``): build everything, then hand it to the loop.

The order matters for users: everything that can fail on bad input (flags, the network module,
the optimizer name, the dataset) is checked before the first byte is written to --output_dir.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import math
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from library.args import parse_key_values, verify_training_args
from library.config import build_blueprints
from library.data import DatasetGroup, batch_latents, build_dataset_group, build_validation_group, make_dataloader
from library.errors import ConfigError
from library.loop import Cadence, Schedule, TrainingRun, make_accelerator
from library.models import StableDiffusionModel, load_stable_diffusion, load_vae
from library.network_protocol import TrainableNetwork, as_trainable_network
from library.noise import (
    NoiseOptions,
    make_noise,
    make_training_scheduler,
    noisy_latents,
    per_sample_loss,
    prediction_target,
    sample_timesteps,
    timestep_weights,
)
from library.optimizers import make_lr_scheduler, make_optimizer, optimizer_class
from library.sampling import generate_samples, load_sample_prompts, make_sampler
from library.saving import modelspec_metadata, per_save_metadata, training_metadata
from library.text import encode_tokens, tokenize_captions
from networks.lora_file import LoRAFileError
from networks.network_args import NetworkError

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def encode_captions(model: StableDiffusionModel, input_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    return encode_tokens(model.text_encoder, input_ids.to(model.text_encoder.device), clip_skip=clip_skip)


# kohya validates at timesteps evenly spread inside [min_timestep, max_timestep].
NUM_VALIDATION_TIMESTEPS = 4


@dataclass
class NetworkTask:
    """One training step of a LoRA-style network, and how to save, sample and validate it."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: StableDiffusionModel
    network: TrainableNetwork
    options: NoiseOptions
    train_text_encoder: bool
    metadata: dict[str, str]
    dataset_group: DatasetGroup
    validation_loader: Iterable | None = None
    sample_prompts: list | None = None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.network.get_trainable_params())

    def checkpoint_objects(self) -> list:
        return [self.network]

    def on_epoch_start(self, epoch: int) -> None:
        self.dataset_group.set_current_epoch(epoch + 1)
        self.network.on_epoch_start(self.model.text_encoder, self.model.unet)

    def on_step_start(self, step: int) -> None:
        self.dataset_group.set_current_step(step)
        self.network.on_step_start(self.model.text_encoder, self.model.unet)

    def _latents(self, batch: dict) -> torch.Tensor:
        if "latents" in batch:  # cached: unscaled, as in kohya's npz files
            return batch["latents"].to(self.accelerator.device, torch.float32) * self.model.vae.config.scaling_factor
        return batch_latents(batch, self.model.vae, dtype=torch.float32)

    def _loss(self, batch: dict, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        latents = self._latents(batch)
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            hidden = encode_captions(self.model, batch["input_ids"], self.args.clip_skip)
        scheduler = self.model.noise_scheduler
        noise = make_noise(latents, self.options)
        if timesteps is None:
            timesteps = sample_timesteps(latents.shape[0], self.options, latents.device)
        noisy = noisy_latents(scheduler, latents, noise, timesteps, self.options)
        unet_dtype = self.model.unet.dtype
        prediction = self.model.unet(noisy.to(unet_dtype), timesteps, hidden.to(unet_dtype)).sample
        target = prediction_target(scheduler, latents, noise, timesteps)
        mask = batch.get("alpha_masks")
        loss = per_sample_loss(prediction, target, timesteps, scheduler, self.options, mask=mask)
        loss = loss * batch["loss_weights"].to(loss.device) * timestep_weights(timesteps, scheduler, self.options)
        return loss.mean()

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self._loss(batch), {}

    def validate(self) -> dict[str, float]:
        """Mean loss over the held-out images at fixed timesteps and a fixed noise seed (kohya's)."""
        if self.validation_loader is None:
            return {}
        bounds = (self.options.min_timestep, self.options.max_timestep)
        fixed = torch.linspace(*bounds, NUM_VALIDATION_TIMESTEPS + 2).long()[1:-1].tolist()
        seed = self.args.validation_seed if self.args.validation_seed is not None else self.args.seed
        losses = []
        device = self.accelerator.device
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for index, batch in enumerate(self.validation_loader):
                if self.args.max_validation_steps is not None and index >= self.args.max_validation_steps:
                    break
                size = batch["input_ids"].shape[0]
                for t in fixed:
                    with self.accelerator.autocast():
                        losses.append(self._loss(batch, torch.full((size,), t, device=device)).item())
        return {"loss/validation": sum(losses) / max(len(losses), 1)}

    def after_optimizer_step(self) -> dict[str, float]:
        if not self.args.scale_weight_norms:
            return {}
        keys_scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(
            self.args.scale_weight_norms, self.accelerator.device
        )
        return {
            "max_norm/keys_scaled": keys_scaled,
            "max_norm/avg_key_norm": mean_norm,
            "max_norm/max_key_norm": max_norm,
        }

    def save_model(self, path: Path, epoch: int, step: int) -> None:
        metadata = {**self.metadata, **per_save_metadata(epoch, step)}
        self.network.save_weights(str(path), SAVE_DTYPES[self.args.save_precision], metadata)

    def sample(self, epoch: int | None, step: int) -> None:
        if not self.sample_prompts:
            return
        device = self.accelerator.device
        vae_place = (self.model.vae.device, self.model.vae.dtype)
        self.model.vae.to(device, torch.float32)
        components = {
            "vae": self.model.vae,
            "text_encoder": self.model.text_encoder,
            "tokenizer": self.model.tokenizer,
            "unet": self.model.unet,
        }

        def encode(prompts: list[str]) -> torch.Tensor:
            ids = tokenize_captions(self.model.tokenizer, prompts, self.args.max_token_length)
            return encode_captions(self.model, ids, self.args.clip_skip).to(self.model.unet.dtype)

        generate_samples(
            components,
            self.sample_prompts,
            encode,
            default_sampler=self.args.sample_sampler,
            v_parameterization=self.model.v_parameterization,
            out_dir=Path(self.args.output_dir) / "sample",
            output_name=self.args.output_name,
            epoch=epoch,
            step=step,
            device=device,
        )
        self.model.vae.to(*vae_place)


class NetworkTrainer:
    """kohya's ``NetworkTrainer``: ``NetworkTrainer(args).train()``.

    ``task_class`` builds the step: a subclass of :class:`NetworkTask` (same constructor) changes
    what a step does without rebuilding models, data and optimizer (e.g. Theseus replacement).
    """

    task_class: type[NetworkTask] = NetworkTask

    def __init__(self, args: argparse.Namespace):
        verify_training_args(args)
        self.args = args

    def _load_model(self) -> StableDiffusionModel:
        args = self.args
        model = load_stable_diffusion(
            args.pretrained_model_name_or_path,
            v2=args.v2 or None,
            v_parameterization=args.v_parameterization or None,
            tokenizer_cache_dir=args.tokenizer_cache_dir,
        )
        model.noise_scheduler = make_training_scheduler(model.v_parameterization, args.zero_terminal_snr)
        if args.vae:
            model.vae = load_vae(args.vae)
        if args.xformers:
            try:
                model.unet.enable_xformers_memory_efficient_attention()
            except (ImportError, ModuleNotFoundError, ValueError) as err:
                raise ConfigError(f"--xformers: {err}; the default SDPA attention needs no extra package") from err
        return model

    def _create_network(self, module, model: StableDiffusionModel) -> TrainableNetwork:
        with network_errors_as_config_errors("--network_args"):
            return self._create_network_unchecked(module, model)

    def _create_network_unchecked(self, module, model: StableDiffusionModel) -> TrainableNetwork:
        args = self.args
        net_kwargs = parse_key_values(args.network_args, "--network_args")
        if args.dim_from_weights:
            if not args.network_weights:
                raise ConfigError("--dim_from_weights needs --network_weights")
            network, _ = module.create_network_from_weights(
                1, args.network_weights, model.vae, model.text_encoder, model.unet, **net_kwargs
            )
        else:
            network = module.create_network(
                1.0,
                args.network_dim,
                args.network_alpha,
                model.vae,
                model.text_encoder,
                model.unet,
                neuron_dropout=args.network_dropout,
                **net_kwargs,
            )
        if network is None:
            raise ConfigError(f"--network_module {args.network_module} built no network from these arguments")
        requested = {
            "ss_network_module": args.network_module,
            "ss_network_dim": str(args.network_dim),
            "ss_network_alpha": str(args.network_alpha),
        }
        return as_trainable_network(network, args.network_module, requested)

    def _merge_base_weights(self, module, model: StableDiffusionModel) -> None:
        multipliers = self.args.base_weights_multiplier or []
        for index, path in enumerate(self.args.base_weights or []):
            multiplier = multipliers[index] if index < len(multipliers) else 1.0
            base, weights = module.create_network_from_weights(
                multiplier, path, model.vae, model.text_encoder, model.unet, for_inference=True
            )
            base.merge_to(model.text_encoder, model.unet, weights, torch.float32, "cpu")
            logger.info("merged --base_weights %s at multiplier %s", path, multiplier)

    def train(self) -> None:
        """Check inputs, build models, data, network and optimizer, then run the loop."""
        args = self.args
        started_at = time.time()
        module = import_network_module(args.network_module)
        optimizer_class(args.optimizer_type)  # an unknown optimizer fails before the model loads
        blueprints = build_blueprints(args)
        sample_prompts = load_sample_prompts(args.sample_prompts) if args.sample_prompts else None
        if sample_prompts:
            make_sampler(args.sample_sampler, False)  # an unknown sampler name fails now, not mid-run
        accelerator = make_accelerator(args, "network_train")
        args.seed = shared_seed(accelerator, args.seed)
        set_seed(args.seed)
        model = self._load_model()
        group = build_dataset_group(
            blueprints, model.tokenizer, max_token_length=args.max_token_length, seed=args.seed
        )
        if args.debug_dataset:
            print_dataset_preview(group)
            return
        validation = build_validation_group(
            blueprints, model.tokenizer, max_token_length=args.max_token_length, seed=args.seed
        )
        self._prepare_latents(accelerator, model, [g for g in (group, validation) if g is not None])
        network = self._build_network(module, model)
        param_groups, lr_descriptions = network.prepare_optimizer_params(
            args.text_encoder_lr or None, args.unet_lr, args.learning_rate
        )
        optimizer_name, optimizer = make_optimizer(args, param_groups)
        self._place_models(accelerator, model, network)

        loader = make_dataloader(group, args.max_data_loader_n_workers, args.persistent_data_loader_workers)
        # Batches each process sees per epoch once accelerate shards the loader (it pads to even).
        schedule = Schedule.from_args(args, math.ceil(len(loader) / accelerator.num_processes))
        # accelerate steps a prepared scheduler once per process per optimizer step (as kohya counts).
        lr_scheduler = make_lr_scheduler(args, optimizer, schedule.max_train_steps * accelerator.num_processes)
        optimizer, loader, lr_scheduler = accelerator.prepare(optimizer, loader, lr_scheduler)
        validation_loader = accelerator.prepare(make_dataloader(validation)) if validation is not None else None
        group.set_max_train_steps(schedule.max_train_steps)

        metadata = training_metadata(
            args,
            network_metadata=network.network_metadata(),
            dataset_metadata=group.metadata(
                validation=validation,
                num_processes=accelerator.num_processes,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
            ),
            optimizer_name=optimizer_name,
            base_model_version=model.base_model_version,
            v2=model.v2,
            num_epochs=schedule.num_epochs,
            num_batches_per_epoch=len(loader),
            started_at=started_at,
        )
        metadata.update(
            modelspec_metadata(args, v2=model.v2, v_parameterization=model.v_parameterization, started_at=started_at)
        )
        task = self.task_class(
            args, accelerator, model, network, NoiseOptions.from_args(args), not args.network_train_unet_only,
            metadata, group, validation_loader, sample_prompts,
        )  # fmt: skip
        cadence = Cadence.from_args(args, default_name="last", num_epochs=schedule.num_epochs)
        run = TrainingRun(
            accelerator, task, loader, optimizer, lr_scheduler, schedule, cadence, lr_descriptions,
            max_grad_norm=args.max_grad_norm, seed=args.seed,
        )  # fmt: skip
        if args.resume:
            run.resume(args.resume)
        logger.info(
            "training %d steps (%d epochs x %d batches), %d trainable parameters",
            schedule.max_train_steps, schedule.num_epochs, len(loader),
            sum(p.numel() for p in task.trainable_parameters()),
        )  # fmt: skip
        run.run()

    def _prepare_latents(self, accelerator: Accelerator, model: StableDiffusionModel, groups: list) -> None:
        """Cache latents (then the VAE leaves the accelerator), or keep the VAE there for encoding."""
        args = self.args
        vae_dtype = torch.float32 if args.no_half_vae else WEIGHT_DTYPES[args.mixed_precision]
        model.vae.to(accelerator.device, dtype=vae_dtype)
        if not args.cache_latents:
            return
        for group in groups:
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

    def _build_network(self, module, model: StableDiffusionModel) -> TrainableNetwork:
        args = self.args
        self._merge_base_weights(module, model)
        network = self._create_network(module, model)
        train_unet = not args.network_train_text_encoder_only
        network.apply_to(model.text_encoder, model.unet, not args.network_train_unet_only, train_unet)
        if args.network_weights:
            with network_errors_as_config_errors("--network_weights"):
                info = network.load_weights(args.network_weights)
            logger.info("loaded --network_weights %s: %s", args.network_weights, info)
        if args.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            if not args.network_train_unet_only:
                model.text_encoder.gradient_checkpointing_enable()
                model.text_encoder.train()  # transformers checkpoints only in training mode (CLIP has no dropout)
            network.enable_gradient_checkpointing()
        return network

    def _place_models(self, accelerator: Accelerator, model: StableDiffusionModel, network) -> None:
        """Frozen weights in the mixed-precision dtype (kohya's memory saving), network in fp32 unless full_*."""
        args = self.args
        weight_dtype = WEIGHT_DTYPES[args.mixed_precision]
        model.unet.to(accelerator.device, dtype=weight_dtype)
        model.text_encoder.to(accelerator.device, dtype=weight_dtype)
        network.to(accelerator.device, dtype=weight_dtype if (args.full_fp16 or args.full_bf16) else torch.float32)
        network.prepare_grad_etc(model.text_encoder, model.unet)


@contextlib.contextmanager
def network_errors_as_config_errors(flag: str):
    """Our network modules raise ValueErrors of their own (they cannot import library/); name the flag."""
    try:
        yield
    except (NetworkError, LoRAFileError) as err:
        raise ConfigError(f"{flag}: {err}") from err


def shared_seed(accelerator: Accelerator, seed: int | None) -> int:
    """The given seed, or one drawn on the main process and shared, so every process plans the same data."""
    if seed is not None:
        return seed
    drawn = [random.SystemRandom().randint(0, 2**31 - 1)]
    broadcast_object_list(drawn)
    return drawn[0]


def print_dataset_preview(group: DatasetGroup, batches: int = 4) -> None:
    """kohya's --debug_dataset, in text: what the first batches of epoch 1 hold."""
    group.set_current_epoch(1)
    for index in range(min(batches, len(group))):
        batch = group[index]
        data = batch["latents"] if "latents" in batch else batch["images"]
        print(f"batch {index}: {tuple(data.shape)} loss weights {batch['loss_weights'].tolist()}")
        for key, caption in zip(batch["image_keys"], batch["captions"]):
            print(f"  {key}: {caption}")
