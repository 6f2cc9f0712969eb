"""LoRA-style network training (``train_network.py``): build everything, then hand it to the loop.

The order matters for users: everything that can fail on bad input (flags, the network module,
the optimizer name, the dataset) is checked before the first byte is written to --output_dir.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from library.data.dataset_config import build_blueprints
from library.data.dataset_group import DatasetGroup, batch_latents, build_dataset_group, build_validation_group
from library.models.stable_diffusion import StableDiffusionModel
from library.training.args import verify_training_args
from library.training.loop import make_accelerator
from library.training.masked_loss import loss_mask
from library.training.network_protocol import TrainableNetwork
from library.training.noise import (
    NoiseOptions,
    make_noise,
    noisy_latents,
    per_sample_loss,
    prediction_target,
    sample_timesteps,
    timestep_weights,
)
from library.training.optimizers import optimizer_class
from library.training.parts import (
    SAVE_DTYPES,
    WEIGHT_DTYPES,
    create_network,
    enable_xformers,
    encode_captions,
    import_network_module,
    load_network_weights,
    load_training_model,
    network_errors_as_config_errors,
    prepare_latents,
    prepare_optimization,
    print_dataset_preview,
    render_samples,
    run_metadata,
    shared_seed,
    start_run,
    validation_timesteps,
)
from library.training.sampling import load_sample_prompts, make_sampler
from library.training.saving import per_save_metadata

logger = logging.getLogger(__name__)


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

    def _loss(self, batch: dict, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        latents = batch_latents(batch, self.model.vae, dtype=torch.float32, device=self.accelerator.device)
        # kohya runs text encoding and the UNet under autocast: frozen weights in the mixed-precision
        # dtype meet trained fp32 network weights (a foreign network does not cast them itself)
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()), self.accelerator.autocast():
            hidden = encode_captions(self.model, batch["input_ids"], self.args.clip_skip)
        scheduler = self.model.noise_scheduler
        noise = make_noise(latents, self.options)
        if timesteps is None:
            timesteps = sample_timesteps(latents.shape[0], self.options, latents.device)
        noisy = noisy_latents(scheduler, latents, noise, timesteps, self.options)
        unet_dtype = self.model.unet.dtype
        with self.accelerator.autocast():
            prediction = self.model.unet(noisy.to(unet_dtype), timesteps, hidden.to(unet_dtype)).sample
        target = prediction_target(scheduler, latents, noise, timesteps)
        mask = loss_mask(batch)
        loss = per_sample_loss(prediction, target, timesteps, scheduler, self.options, mask=mask)
        loss = loss * batch["loss_weights"].to(loss.device) * timestep_weights(timesteps, scheduler, self.options)
        return loss.mean()

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self._loss(batch), {}

    def validate(self) -> dict[str, float]:
        """Mean loss over the held-out images at fixed timesteps and a fixed noise seed (kohya's)."""
        if self.validation_loader is None:
            return {}
        fixed = validation_timesteps(self.options)
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
        if self.sample_prompts:
            render_samples(self.args, self.accelerator, self.model, self.model.unet, self.sample_prompts, epoch, step)


class NetworkTrainer:
    """kohya's ``NetworkTrainer``: ``NetworkTrainer(args).train()``.

    ``task_class`` builds the step: a subclass of :class:`NetworkTask` (same constructor) changes
    what a step does without rebuilding models, data and optimizer (e.g. Theseus replacement).
    """

    task_class: type[NetworkTask] = NetworkTask

    def __init__(self, args: argparse.Namespace):
        verify_training_args(args)
        self.args = args

    def _merge_base_weights(self, module, model: StableDiffusionModel) -> None:
        multipliers = self.args.base_weights_multiplier or []
        for index, path in enumerate(self.args.base_weights or []):
            multiplier = multipliers[index] if index < len(multipliers) else 1.0
            with network_errors_as_config_errors("--base_weights"):
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
        model = load_training_model(args)
        if args.xformers:
            enable_xformers(model.unet)
        group = build_dataset_group(
            blueprints, model.tokenizer, max_token_length=args.max_token_length, seed=args.seed
        )
        if args.debug_dataset:
            print_dataset_preview(group)
            return
        validation = build_validation_group(
            blueprints, model.tokenizer, max_token_length=args.max_token_length, seed=args.seed
        )
        prepare_latents(args, accelerator, model, [group, validation])
        network = self._build_network(module, model)
        param_groups, lr_descriptions = network.prepare_optimizer_params(
            args.text_encoder_lr or None, args.unet_lr, args.learning_rate
        )
        self._place_models(accelerator, model, network)
        prepared = prepare_optimization(args, accelerator, param_groups, group, validation)
        metadata = run_metadata(args, accelerator, model, network, group, validation, prepared, started_at)
        task = self.task_class(
            args, accelerator, model, network, NoiseOptions.from_args(args), not args.network_train_unet_only,
            metadata, group, prepared.validation_loader, sample_prompts,
        )  # fmt: skip
        run = start_run(args, accelerator, task, prepared, lr_descriptions)
        schedule = prepared.schedule
        logger.info(
            "training %d steps (%d epochs x %d batches), %d trainable parameters",
            schedule.max_train_steps, schedule.num_epochs, len(prepared.loader),
            sum(p.numel() for p in task.trainable_parameters()),
        )  # fmt: skip
        run.run()

    def _build_network(self, module, model: StableDiffusionModel) -> TrainableNetwork:
        args = self.args
        self._merge_base_weights(module, model)
        network = create_network(args, module, model)
        train_unet = not args.network_train_text_encoder_only
        network.apply_to(model.text_encoder, model.unet, not args.network_train_unet_only, train_unet)
        load_network_weights(args, network)
        if args.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            if not args.network_train_unet_only:
                # Non-reentrant checkpoints pass gradients to the network's weights inside a layer even
                # though the layer inputs (token embeddings) need none; transformers' default reentrant
                # ones do not, which left the text encoder's LoRA untrained (kohya instead makes the
                # embeddings require grad). diffusers' UNet checkpoints are non-reentrant already.
                model.text_encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
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
