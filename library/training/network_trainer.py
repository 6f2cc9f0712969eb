"""LoRA-style network training (``train_network.py``): build everything, then hand it to the loop.

The order matters for users: everything that can fail on bad input (flags, the network module,
the optimizer name, the dataset) is checked before the first byte is written to --output_dir.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from library.data.dataset_config import build_blueprints
from library.data.dataset_group import DatasetGroup, batch_latents
from library.data.text_encoder_cache import (
    SD_TE_OUTPUT_KEYS,
    TextOutputs,
    batch_text_outputs,
    cache_text_encoder_outputs,
    check_text_encoder_outputs_cacheable,
)
from library.models.stable_diffusion import StableDiffusionModel
from library.models.text_encoding import tokenize_captions
from library.training.args import verify_training_args
from library.training.masked_loss import loss_mask
from library.training.memory import release_unneeded_models
from library.training.model_setup import (
    SAVE_DTYPES,
    enable_gradient_checkpointing,
    enable_xformers,
    load_training_model,
    place_frozen,
    trained_dtype,
    weight_dtype,
)
from library.training.network_protocol import TrainableNetwork
from library.training.networks import (
    create_network,
    import_network_module,
    load_network_weights,
    network_errors_as_config_errors,
    text_encoder_arg,
)
from library.training.noise import NoiseOptions, diffusion_loss, validation_timesteps
from library.training.optimizers import lr_scheduler_class, optimizer_class
from library.training.sampling import render_samples
from library.training.saving import per_save_metadata
from library.training.skeleton import Prepared, RunInputs, TaskPlan, TrainerSkeleton, run_metadata
from library.training.text_conditioning import caption_hidden_states
from library.training.trackers import compile_for_training

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
    text_outputs: dict[str, TextOutputs] | None = None  # --cache_text_encoder_outputs
    render_samples = staticmethod(render_samples)  # the family's sampling (SDXL: its own pipeline)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.network.get_trainable_params())

    def checkpoint_objects(self) -> list:
        return [self.network]

    def on_epoch_start(self, epoch: int) -> None:
        self.dataset_group.set_current_epoch(epoch + 1)
        self.network.on_epoch_start(text_encoder_arg(self.model), self.model.unet)

    def on_step_start(self, step: int) -> None:
        self.dataset_group.set_current_step(step)
        self.network.on_step_start(text_encoder_arg(self.model), self.model.unet)

    def unet_conditioning(self, batch: dict) -> dict:
        """The UNet's keyword arguments for a batch (the model family's text conditioning)."""
        if self.text_outputs is not None:
            (hidden,) = batch_text_outputs(self.text_outputs, batch["image_keys"], self.accelerator.device)
            return self.model.family.unet_conditioning(hidden.to(self.model.unet.dtype))
        # kohya encodes and runs the UNet under autocast: there frozen weights in the mixed-precision
        # dtype meet trained float32 ones, which a foreign network (LyCORIS) does not cast itself
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()), self.accelerator.autocast():
            hidden = caption_hidden_states(self.model, batch, self.args)
        return self.model.family.unet_conditioning(hidden.to(self.model.unet.dtype))

    def _loss(self, batch: dict, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        latents = batch_latents(batch, self.model.vae, dtype=torch.float32, device=self.accelerator.device)
        unet, conditioning = self.model.unet, self.unet_conditioning(batch)

        def predict(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self.accelerator.autocast():
                return unet(noisy.to(unet.dtype), t, **conditioning).sample

        scheduler = self.model.noise_scheduler
        weights, mask = batch["loss_weights"], loss_mask(batch)
        return diffusion_loss(predict, latents, scheduler, self.options, weights, mask=mask, timesteps=timesteps).loss

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
            "norm/avg_key_norm": mean_norm,
            "max_norm/max_key_norm": max_norm,
        }

    def save_model(self, path: Path, epoch: int, step: int) -> None:
        metadata = {**self.metadata, **per_save_metadata(epoch, step)}
        self.network.save_weights(str(path), SAVE_DTYPES[self.args.save_precision], metadata)

    def sample(self, epoch: int | None, step: int) -> list[tuple[Path, str]]:
        if not self.sample_prompts:
            return []
        unet = getattr(self.model.unet, "_orig_mod", self.model.unet)  # not the --torch_compile one: new shapes
        with self.accelerator.autocast():  # as kohya samples; a foreign network's weights stay float32
            return self.render_samples(
                self.args, self.accelerator.device, self.model, unet, self.sample_prompts, epoch, step
            )


class NetworkTrainer(TrainerSkeleton):
    """kohya's ``NetworkTrainer``: ``NetworkTrainer(args).train()``.

    ``task_class`` builds the step: a subclass of :class:`NetworkTask` (same constructor) changes
    what a step does without rebuilding models, data and optimizer (e.g. Theseus replacement).
    """

    task_class: type[NetworkTask] = NetworkTask
    log_name = "network_train"

    def __init__(self, args: argparse.Namespace):
        verify_training_args(args)
        super().__init__(args)

    def check_inputs(self) -> None:
        self.module = import_network_module(self.args.network_module)
        optimizer_class(self.args.optimizer_type)  # an unknown optimizer fails before the model loads
        if self.args.lr_scheduler_type:
            lr_scheduler_class(self.args.lr_scheduler_type)
        if self.args.cache_text_encoder_outputs:
            check_text_encoder_outputs_cacheable(build_blueprints(self.args, self.bucket_reso_multiple))

    def load_models(self) -> StableDiffusionModel:
        model = load_training_model(self.args, frozen_dtypes=True)
        if self.args.xformers:
            enable_xformers(model.unet)
        return model

    def build_task(self, inputs: RunInputs) -> TaskPlan:
        args, model = self.args, inputs.model
        self.network = self._build_network(self.module, model)
        param_groups, lr_descriptions = self.network.prepare_optimizer_params(
            args.text_encoder_lr or None, args.unet_lr, args.learning_rate
        )
        self._place_models(inputs.accelerator, model, self.network)
        task = self.task_class(
            args, inputs.accelerator, model, self.network, NoiseOptions.from_args(args),
            not args.network_train_unet_only, {}, inputs.group, None, inputs.sample_prompts,
        )  # fmt: skip
        if args.cache_text_encoder_outputs:
            task.text_outputs = self.cache_text_outputs(inputs)
        return TaskPlan(task, param_groups, lr_descriptions)

    def release_unneeded(self, inputs: RunInputs, plan: TaskPlan) -> None:
        """Free the VAE once latents are cached and the text encoders once their outputs are (unless sampling)."""
        args = self.args
        release_unneeded_models(
            inputs.model,
            vae=bool(args.cache_latents) and not inputs.sample_prompts and not args.highvram,
            text_encoders=bool(args.cache_text_encoder_outputs) and not inputs.sample_prompts and not args.highvram,
        )

    def cache_text_outputs(self, inputs: RunInputs) -> dict[str, TextOutputs]:
        """Encode every caption once with the frozen text encoder (placed by ``build_task``).

        kohya caches text-encoder outputs only for SDXL; here SD1/SD2 cache the UNet's conditioning
        (``--clip_skip`` and ``--max_token_length`` applied) in the same ``_te_outputs.npz`` files.
        """
        model, accelerator, args = inputs.model, inputs.accelerator, self.args

        def encode(captions: list[str]) -> TextOutputs:
            ids = tokenize_captions(model.tokenizer, captions, args.max_token_length)
            with accelerator.autocast():
                return (model.encode_prompt(ids, args.clip_skip),)

        cache = cache_text_encoder_outputs(
            [inputs.group, inputs.validation], encode, to_disk=args.cache_text_encoder_outputs_to_disk,
            keys=SD_TE_OUTPUT_KEYS, extra={"clip_skip": args.clip_skip or 0}, text_encoders=[model.text_encoder],
        )  # fmt: skip
        accelerator.wait_for_everyone()
        logger.info("cached text encoder outputs of %d images (%s)", len(cache), weight_dtype(args))
        return cache

    def metadata(self, inputs: RunInputs, prepared: Prepared) -> dict[str, str]:
        return run_metadata(
            self.args, inputs.accelerator, inputs.model, self.network, inputs.group, inputs.validation, prepared,
            inputs.started_at,
        )  # fmt: skip

    def _merge_base_weights(self, module, model: StableDiffusionModel) -> None:
        multipliers = self.args.base_weights_multiplier or []
        for index, path in enumerate(self.args.base_weights or []):
            multiplier = multipliers[index] if index < len(multipliers) else 1.0
            with network_errors_as_config_errors("--base_weights"):
                base, weights = module.create_network_from_weights(
                    multiplier, path, model.vae, text_encoder_arg(model), model.unet, for_inference=True
                )
            base.merge_to(text_encoder_arg(model), model.unet, weights, torch.float32, "cpu")
            logger.info("merged --base_weights %s at multiplier %s", path, multiplier)

    def _build_network(self, module, model: StableDiffusionModel) -> TrainableNetwork:
        args = self.args
        self._merge_base_weights(module, model)
        network = create_network(args, module, model)
        train_unet = not args.network_train_text_encoder_only
        network.apply_to(text_encoder_arg(model), model.unet, not args.network_train_unet_only, train_unet)
        load_network_weights(args, network)
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(
                model.unet, *([] if args.network_train_unet_only else self.text_encoders(model))
            )
            network.enable_gradient_checkpointing()
        return network

    def _place_models(self, accelerator: Accelerator, model: StableDiffusionModel, network) -> None:
        """Frozen weights in the mixed-precision dtype (kohya's memory saving), network in fp32 unless full_*."""
        place_frozen(self.args, accelerator.device, model.unet, *self.text_encoders(model))
        network.to(accelerator.device, dtype=trained_dtype(self.args))
        network.prepare_grad_etc(text_encoder_arg(model), model.unet)
        model.unet = compile_for_training(accelerator, model.unet)  # --torch_compile, with the network patched in

    @staticmethod
    def text_encoders(model) -> list[torch.nn.Module]:
        encoders = text_encoder_arg(model)
        return encoders if isinstance(encoders, list) else [encoders]
