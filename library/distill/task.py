"""One distillation step for the shared loop (``library.training.loop.TrainingRun``), and how the result is
saved, sampled and validated.

The student is trained; the teacher is a :class:`FrozenTeacher` that only the step calls, so it is
never handed to ``accelerator.prepare`` and never in the optimizer, the gradient sync or a saved
state. With Theseus, the forward runs through a :class:`TheseusUNet` whose stages the controller
draws each (micro-)step from ``(seed, step)``, so every process draws alike and a resumed run
repeats the draws. With EMA, saves, samples and validation use the averaged weights; the raw
weights and the average both go into ``--save_state`` folders.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from library.data.dataset_group import DatasetGroup, batch_latents
from library.distill.args import OutputFormat
from library.distill.ema import TrainingEMA
from library.distill.export import save_student
from library.distill.features import FeatureHooks, FeaturePair
from library.distill.loss import DistillLoss, DistillWeights, distill_loss
from library.distill.teacher import FrozenTeacher
from library.models.sdxl import SDXLModel
from library.models.stable_diffusion import StableDiffusionModel
from library.training.masked_loss import loss_mask
from library.training.model_setup import SAVE_DTYPES
from library.training.network_protocol import TrainableNetwork
from library.training.noise import NoiseOptions, diffusion_loss, validation_timesteps
from library.training.sampling import render_samples
from library.training.saving import per_save_metadata
from library.training.sdxl_sampling import render_sdxl_samples
from library.training.sdxl_trainer import sdxl_batch_conditioning
from library.training.text_conditioning import caption_hidden_states
from library.training.theseus import ReplacementState, TheseusController


@dataclass
class DistillTask:
    """A student UNet (or a network on one) trained towards a frozen teacher: task + output + feature KD."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: StableDiffusionModel | SDXLModel  # text encoder, VAE, tokenizer and noise schedule; ``unet`` is the student
    teacher: FrozenTeacher
    net: nn.Module  # the student, or the Theseus hybrid around it
    pairs: list[FeaturePair]
    weights: DistillWeights
    options: NoiseOptions
    output: OutputFormat
    dataset_group: DatasetGroup
    network: TrainableNetwork | None = None
    theseus: TheseusController | None = None
    validation_loader: Iterable | None = None
    sample_prompts: list | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.student_hooks = FeatureHooks(self.student, [pair.student for pair in self.pairs])
        trained = self.network.get_trainable_params() if self.network is not None else self.student.parameters()
        self._trainable = [p for p in trained if p.requires_grad]
        self.ema = TrainingEMA(self._trainable, self.args.ema_decay) if self.args.use_ema else None
        self.theseus_state: ReplacementState | None = None
        self._step, self._micro_step = -1, 0

    @property
    def student(self) -> nn.Module:
        return self.model.unet

    # ---- the loop's protocol -------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._trainable

    def checkpoint_objects(self) -> list:
        trained = self.network if self.network is not None else self.student
        return [trained] + ([self.ema] if self.ema is not None else [])

    def on_epoch_start(self, epoch: int) -> None:
        self.dataset_group.set_current_epoch(epoch + 1)
        if self.network is not None:
            self.network.on_epoch_start(self.model.text_encoder, self.student)
        self.net.train()

    def on_step_start(self, step: int) -> None:
        self.dataset_group.set_current_step(step)
        if self.network is not None:
            self.network.on_step_start(self.model.text_encoder, self.student)
        if self.theseus is not None:
            # Micro-batches of one optimizer step draw afresh, still as a function of (seed, step, index).
            self._micro_step = self._micro_step + 1 if step == self._step else 0
            self._step = step
            if self.args.theseus_steps is not None and step >= self.args.theseus_steps:
                self.theseus.finish()
            self.theseus_state = self.theseus.step(step, self._micro_step)

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self._loss(batch)
        logs = loss.log_values()
        if self.theseus_state is not None:
            logs["theseus/probability"] = self.theseus_state.probability
            logs["theseus/replacement_rate"] = self.theseus_state.rate
        return loss.total, logs

    def after_optimizer_step(self) -> dict[str, float]:
        logs = {}
        if self.network is not None and self.args.scale_weight_norms:
            keys_scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(
                self.args.scale_weight_norms, self.accelerator.device
            )
            logs.update(
                {
                    "max_norm/keys_scaled": keys_scaled,
                    "max_norm/avg_key_norm": mean_norm,
                    "max_norm/max_key_norm": max_norm,
                }
            )
        if self.ema is not None:
            self.ema.step(self._trainable)
            logs["ema/decay"] = self.ema.cur_decay_value
        return logs

    def save_model(self, path: Path, epoch: int, step: int) -> None:
        dtype = SAVE_DTYPES[self.args.save_precision]
        with self._saved_weights():
            if self.network is not None:
                metadata = {**self.metadata, **per_save_metadata(epoch, step)}
                self.network.save_weights(str(path), dtype, metadata)
                return
            extension = self.output.extension
            folder = path.with_name(path.name.removesuffix(f".{extension}")) if extension else path
            save_student(self.model, folder, path if extension else None, dtype or torch.float32)

    def sample(self, epoch: int | None, step: int) -> None:
        if not self.sample_prompts:
            return
        # The pipeline casts the prompt embeddings to the text encoder's dtype, which under mixed
        # precision is not the float32 student's; autocast runs both in the mixed dtype.
        render = render_sdxl_samples if isinstance(self.model, SDXLModel) else render_samples
        with self._saved_weights(), self._evaluating(), self.accelerator.autocast():
            render(self.args, self.accelerator.device, self.model, self.student, self.sample_prompts, epoch, step)

    def validate(self) -> dict[str, float]:
        """The loss terms of the saved weights on the held-out images, at fixed timesteps and noise."""
        if self.validation_loader is None:
            return {}
        fixed = validation_timesteps(self.options)
        seed = self.args.validation_seed if self.args.validation_seed is not None else self.args.seed
        device = self.accelerator.device
        losses: list[DistillLoss] = []
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with self._saved_weights(), self._evaluating(), torch.no_grad(), rng:
            torch.manual_seed(seed)
            for index, batch in enumerate(self.validation_loader):
                if self.args.max_validation_steps is not None and index >= self.args.max_validation_steps:
                    break
                size = batch["input_ids"].shape[0]
                losses += [self._loss(batch, torch.full((size,), t, device=device)) for t in fixed]
        if not losses:
            return {}
        terms = {"": "total", "_task": "task", "_kd_output": "output_kd", "_kd_feature": "feature_kd"}
        return {
            f"loss/validation{suffix}": sum(float(getattr(loss, term)) for loss in losses) / len(losses)
            for suffix, term in terms.items()
        }

    # ---- the step --------------------------------------------------------------------------

    def _loss(self, batch: dict, timesteps: torch.Tensor | None = None) -> DistillLoss:
        latents = batch_latents(batch, self.model.vae, dtype=torch.float32, device=self.accelerator.device)
        dtype = self.student.dtype
        with torch.no_grad():
            conditioning = self._conditioning(batch)  # the teacher casts it to its own dtype
        student_conditioning = _cast(conditioning, dtype)
        # A Theseus draw runs some stages from the teacher, whose student blocks then record nothing.
        every_block_runs = self.theseus is None or not self.net.training
        seen = {}

        def predict(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen["teacher"] = self.teacher(noisy, t, **conditioning)
            with self.accelerator.autocast(), self.student_hooks.capture(require_all=every_block_runs) as features:
                seen["features"] = features
                return self.net(noisy.to(dtype), t, **student_conditioning).sample

        scheduler, weights, mask = self.model.noise_scheduler, batch["loss_weights"], loss_mask(batch)
        task = diffusion_loss(predict, latents, scheduler, self.options, weights, mask=mask, timesteps=timesteps)
        teacher = seen["teacher"]
        return distill_loss(
            task.prediction, teacher.prediction, task.target, seen["features"], teacher.features, self.pairs,
            self.weights, task.loss,
        )  # fmt: skip

    def _conditioning(self, batch: dict) -> dict:
        """The UNet's keyword arguments besides sample and timestep (SDXL: both encoders, pooled text, sizes)."""
        if isinstance(self.model, SDXLModel):
            # float32 holds the encoders' outputs exactly and the size numbers without rounding.
            return sdxl_batch_conditioning(self.model, batch, self.accelerator.device, torch.float32)
        hidden = caption_hidden_states(self.model, batch, self.args)
        return self.model.family.unet_conditioning(hidden)

    def _saved_weights(self) -> contextlib.AbstractContextManager:
        """The weights a save shows: the EMA when there is one."""
        return self.ema.averaged(self._trainable) if self.ema is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _evaluating(self):
        """The student alone (no Theseus draws), in eval mode; training mode again afterwards."""
        modules = [self.net] + [self.network] if isinstance(self.network, nn.Module) else [self.net]
        for module in modules:
            module.eval()
        try:
            yield
        finally:
            for module in modules:
                module.train()


def _cast(conditioning: dict, dtype: torch.dtype) -> dict:
    """The UNet keyword arguments with every tensor (also inside ``added_cond_kwargs``) in ``dtype``."""
    return {
        key: _cast(value, dtype) if isinstance(value, dict) else value.to(dtype) for key, value in conditioning.items()
    }
