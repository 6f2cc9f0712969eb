"""LoRA-style network training (``train_network.py``): build everything, then hand it to the loop.

The order matters for users: everything that can fail on bad input (flags, the network module,
the optimizer name, the dataset) is checked before the first byte is written to --output_dir.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from library.args import parse_key_values, verify_training_args
from library.config import build_blueprints
from library.data import build_dataset_group, make_dataloader
from library.errors import ConfigError
from library.loop import SaveOptions, Schedule, TrainingRun, make_accelerator
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
from library.optimizers import make_lr_scheduler, make_optimizer
from library.sampling import generate_samples, load_sample_prompts, make_sampler
from library.saving import modelspec_metadata, per_save_metadata, training_metadata
from library.text import encode_tokens, tokenize_captions

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
    return encode_tokens(model.text_encoder, input_ids.to(model.text_encoder.device), clip_skip=clip_skip, v2=model.v2)


@dataclass
class NetworkTask:
    """One training step of a LoRA-style network, and how to save and sample it (TrainingTask)."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: StableDiffusionModel
    network: TrainableNetwork
    options: NoiseOptions
    train_text_encoder: bool
    metadata: dict[str, str]
    dataset_group: object
    sample_prompts: list | None = None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.network.get_trainable_params())

    def checkpoint_objects(self) -> list:
        return [self.network]

    def on_epoch_start(self, epoch: int) -> None:
        self.dataset_group.set_current_epoch(epoch + 1)
        self.network.on_epoch_start(self.model.text_encoder, self.model.unet)

    def _latents(self, batch: dict) -> torch.Tensor:
        vae = self.model.vae
        if batch.get("latents") is not None:
            latents = batch["latents"].to(self.accelerator.device)
        else:
            with torch.no_grad():
                images = batch["images"].to(self.accelerator.device, dtype=vae.dtype)
                latents = vae.encode(images).latent_dist.sample()
        return latents.float() * vae.config.scaling_factor

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        self.network.on_step_start(self.model.text_encoder, self.model.unet)
        latents = self._latents(batch)
        with torch.set_grad_enabled(self.train_text_encoder):
            hidden = encode_captions(self.model, batch["input_ids"], self.args.clip_skip)
        scheduler = self.model.noise_scheduler
        noise = make_noise(latents, self.options)
        timesteps = sample_timesteps(latents.shape[0], self.options, latents.device)
        noisy = noisy_latents(scheduler, latents, noise, timesteps, self.options)
        unet_dtype = self.model.unet.dtype
        prediction = self.model.unet(noisy.to(unet_dtype), timesteps, hidden.to(unet_dtype)).sample
        target = prediction_target(scheduler, latents, noise, timesteps)
        loss = per_sample_loss(prediction, target, timesteps, scheduler, self.options)
        loss = loss * batch["loss_weights"].to(loss.device) * timestep_weights(timesteps, scheduler, self.options)
        return loss.mean(), {}

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
        vae_device = self.model.vae.device
        self.model.vae.to(device)
        components = {
            "vae": self.model.vae,
            "text_encoder": self.model.text_encoder,
            "tokenizer": self.model.tokenizer,
            "unet": self.model.unet,
        }

        def encode(prompts: list[str]) -> torch.Tensor:
            ids = tokenize_captions(self.model.tokenizer, prompts, self.args.max_token_length)
            return encode_captions(self.model, ids, self.args.clip_skip)

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
        self.model.vae.to(vae_device)


class NetworkTrainer:
    """kohya's ``NetworkTrainer``: ``NetworkTrainer(args).train()``."""

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
        args = self.args
        started_at = time.time()
        module = import_network_module(args.network_module)
        train_unet = not args.network_train_text_encoder_only
        train_text_encoder = not args.network_train_unet_only
        blueprints = build_blueprints(args)
        sample_prompts = load_sample_prompts(args.sample_prompts) if args.sample_prompts else None
        if sample_prompts:
            make_sampler(args.sample_sampler, False)  # fail now on an unknown sampler name

        accelerator = make_accelerator(args, "network_train")
        if args.seed is not None:
            set_seed(args.seed)
        model = self._load_model()
        group = build_dataset_group(
            blueprints, model.tokenizer, max_token_length=args.max_token_length, seed=args.seed or 0
        )
        if args.debug_dataset:
            group.debug_print()
            return
        weight_dtype = WEIGHT_DTYPES[args.mixed_precision]
        device = accelerator.device
        if args.cache_latents:
            vae_dtype = torch.float32 if args.no_half_vae else weight_dtype
            model.vae.to(device, dtype=vae_dtype)
            group.cache_latents(
                model.vae,
                vae_batch_size=args.vae_batch_size,
                to_disk=args.cache_latents_to_disk,
                device=device,
                dtype=vae_dtype,
                process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
            )
            model.vae.to("cpu")
            accelerator.wait_for_everyone()
        else:
            model.vae.to(device, dtype=torch.float32 if args.no_half_vae else weight_dtype)

        self._merge_base_weights(module, model)
        network = self._create_network(module, model)
        network.apply_to(model.text_encoder, model.unet, train_text_encoder, train_unet)
        if args.network_weights:
            info = network.load_weights(args.network_weights)
            logger.info("loaded --network_weights %s: %s", args.network_weights, info)
        if args.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            if train_text_encoder:
                model.text_encoder.gradient_checkpointing_enable()
            network.enable_gradient_checkpointing()

        text_encoder_lr = args.text_encoder_lr if args.text_encoder_lr else None
        param_groups, lr_descriptions = network.prepare_optimizer_params(
            text_encoder_lr, args.unet_lr, args.learning_rate
        )
        optimizer_name, optimizer = make_optimizer(args, param_groups)

        model.unet.to(device, dtype=weight_dtype)
        model.text_encoder.to(device, dtype=weight_dtype)
        network.to(device, dtype=weight_dtype if (args.full_fp16 or args.full_bf16) else torch.float32)
        network.prepare_grad_etc(model.text_encoder, model.unet)
        if args.gradient_checkpointing and train_text_encoder:
            model.text_encoder.train()  # transformers checkpoints only in training mode (CLIP has no dropout)

        dataloader = make_dataloader(group, args.max_data_loader_n_workers, args.persistent_data_loader_workers)
        # Batches each process sees per epoch once accelerate shards the loader (it pads to even).
        schedule = Schedule.from_args(args, math.ceil(len(dataloader) / accelerator.num_processes))
        # accelerate steps a prepared scheduler once per process per optimizer step (as in kohya).
        lr_scheduler = make_lr_scheduler(args, optimizer, schedule.max_train_steps * accelerator.num_processes)
        optimizer, dataloader, lr_scheduler = accelerator.prepare(optimizer, dataloader, lr_scheduler)

        metadata = training_metadata(
            args,
            network_metadata=network.network_metadata(),
            dataset_metadata=group.metadata(),
            optimizer_name=optimizer_name,
            base_model_version=model.base_model_version,
            v2=model.v2,
            num_epochs=schedule.num_epochs,
            num_batches_per_epoch=len(dataloader),
            started_at=started_at,
        )
        metadata.update(
            modelspec_metadata(args, v2=model.v2, v_parameterization=model.v_parameterization, started_at=started_at)
        )
        task = NetworkTask(
            args,
            accelerator,
            model,
            network,
            NoiseOptions.from_args(args),
            train_text_encoder,
            metadata,
            group,
            sample_prompts,
        )
        run = TrainingRun(
            accelerator,
            task,
            dataloader,
            optimizer,
            lr_scheduler,
            schedule,
            SaveOptions.from_args(args, default_name="last", num_epochs=schedule.num_epochs),
            lr_descriptions,
            max_grad_norm=args.max_grad_norm,
            seed=args.seed,
        )
        if args.resume:
            run.resume(args.resume)
        logger.info(
            "training %d steps (%d epochs, %d batches/epoch), %d trainable parameters",
            schedule.max_train_steps,
            schedule.num_epochs,
            len(dataloader),
            sum(p.numel() for p in task.trainable_parameters()),
        )
        run.run()
