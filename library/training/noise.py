"""Noise, timesteps, targets and loss weighting of SD training, with kohya's options.

Each option cites the method it implements; the defaults reproduce plain DDPM epsilon/v training.
All randomness comes from torch's generator (never Python's ``random``), so a run resumed from a
saved state draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.training.masked_loss import apply_loss_mask


@dataclass(frozen=True)
class NoiseOptions:
    """The subset of kohya's flags that shape noise, timesteps and the loss."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int = 1000
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NoiseOptions:
        values = {name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)}
        values["min_timestep"] = args.min_timestep if args.min_timestep is not None else 0
        values["max_timestep"] = args.max_timestep if args.max_timestep is not None else 1000
        return cls(**values)


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod).clamp(min=1e-20)


def sample_timesteps(batch_size: int, options: NoiseOptions, device: torch.device) -> torch.Tensor:
    return torch.randint(options.min_timestep, options.max_timestep, (batch_size,), device=device).long()


def _pyramid_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise (Whitaker, "multi-resolution noise for diffusion model training")."""
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = float(torch.rand(1)) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        coarse = torch.randn(b, c, hn, wn, device=noise.device, dtype=noise.dtype)
        noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def make_noise(latents: torch.Tensor, options: NoiseOptions) -> torch.Tensor:
    """Gaussian noise with kohya's noise offset (Guttenberg) and multires options applied."""
    noise = torch.randn_like(latents)
    if options.noise_offset:
        offset = options.noise_offset
        if options.noise_offset_random_strength:
            offset = float(torch.rand(1)) * offset
        offset = torch.full((latents.shape[0], latents.shape[1], 1, 1), offset, device=latents.device)
        if options.adaptive_noise_scale:
            offset = offset + options.adaptive_noise_scale * latents.mean((2, 3), keepdim=True).abs()
        noise = noise + offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    if options.multires_noise_iterations:
        noise = _pyramid_noise(noise, options.multires_noise_iterations, options.multires_noise_discount)
    return noise


def noisy_latents(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    options: NoiseOptions,
) -> torch.Tensor:
    """x_t; with ``ip_noise_gamma`` the input noise is perturbed but the target is not (Ning et al. 2023)."""
    if options.ip_noise_gamma:
        gamma = options.ip_noise_gamma
        if options.ip_noise_gamma_random_strength:
            gamma = float(torch.rand(1)) * gamma
        noise = noise + gamma * torch.randn_like(latents)
    return scheduler.add_noise(latents, noise, timesteps)


def prediction_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def _huber_c(scheduler: DDPMScheduler, timesteps: torch.Tensor, options: NoiseOptions) -> torch.Tensor:
    if options.huber_schedule == "constant":
        c = torch.full(timesteps.shape, options.huber_c, device=timesteps.device)
    elif options.huber_schedule == "exponential":
        alpha = -math.log(options.huber_c) / scheduler.config.num_train_timesteps
        c = torch.exp(-alpha * timesteps.float())
    else:  # "snr": small c (L1-like) at high noise, as kohya's huber_schedule=snr
        sigmas = (1.0 / snr(scheduler, timesteps)).sqrt()
        c = (1 - options.huber_c) / (1 + sigmas) ** 2 + options.huber_c
    return (c * options.huber_scale).view(-1, 1, 1, 1)


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    options: NoiseOptions,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Element-wise loss averaged over C,H,W -> shape (B,), in float32.

    ``mask`` (B,H,W in pixels, :func:`library.training.masked_loss.loss_mask`) weights the loss
    before averaging, as kohya's ``apply_masked_loss``.
    """
    prediction, target = prediction.float(), target.float()
    if options.loss_type == "l2":
        loss = F.mse_loss(prediction, target, reduction="none")
    elif options.loss_type == "l1":
        loss = F.l1_loss(prediction, target, reduction="none")
    else:
        c = _huber_c(scheduler, timesteps, options)
        pseudo = torch.sqrt((prediction - target) ** 2 + c**2) - c
        loss = 2 * c * pseudo if options.loss_type == "huber" else 2 * pseudo
    if mask is not None:
        loss = apply_loss_mask(loss, mask)
    return loss.mean(dim=(1, 2, 3))


def timestep_weights(timesteps: torch.Tensor, scheduler: DDPMScheduler, options: NoiseOptions) -> torch.Tensor:
    """Product of kohya's per-timestep loss weights, shape (B,)."""
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    ratio = snr(scheduler, timesteps).float()
    weight = torch.ones_like(ratio)
    if options.min_snr_gamma:  # Hang et al. 2023, "Efficient diffusion training via Min-SNR weighting"
        clipped = ratio.clamp(max=options.min_snr_gamma)
        weight = weight * (clipped / (ratio + 1) if v_prediction else clipped / ratio)
    capped = ratio.clamp(max=1000)
    if options.scale_v_pred_loss_like_noise_pred:
        weight = weight * capped / (capped + 1)
    if options.v_pred_like_loss:
        weight = weight * (1 + options.v_pred_like_loss / (capped / (capped + 1)))
    if options.debiased_estimation_loss:  # Yu et al. 2024, "Debias the training of diffusion models"
        weight = weight * (1 / (capped + 1) if v_prediction else 1 / capped.sqrt())
    return weight


# kohya validates at timesteps evenly spread inside [min_timestep, max_timestep].
NUM_VALIDATION_TIMESTEPS = 4


def validation_timesteps(options: NoiseOptions) -> list[int]:
    bounds = (options.min_timestep, options.max_timestep)
    return torch.linspace(*bounds, NUM_VALIDATION_TIMESTEPS + 2).long()[1:-1].tolist()


@dataclass
class DiffusionLoss:
    """The mean weighted loss of a batch, and what a task may need besides it (e.g. for KD terms)."""

    loss: torch.Tensor
    prediction: torch.Tensor
    target: torch.Tensor


def diffusion_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    scheduler: DDPMScheduler,
    options: NoiseOptions,
    loss_weights: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
) -> DiffusionLoss:
    """The denoising loss every task trains on: noise, noisy latents, target by prediction type, weighting.

    ``predict(noisy_latents, timesteps)`` runs the model being trained. ``timesteps`` fixes the
    timesteps (validation); otherwise they are drawn from ``options``' range. ``loss_weights`` are
    the per-image weights of the dataset (kohya's prior-loss weight). Random numbers are drawn in a
    fixed order (noise, timesteps, input perturbation), so runs and resumed runs repeat exactly.
    """
    noise = make_noise(latents, options)
    if timesteps is None:
        timesteps = sample_timesteps(latents.shape[0], options, latents.device)
    noisy = noisy_latents(scheduler, latents, noise, timesteps, options)
    target = prediction_target(scheduler, latents, noise, timesteps)
    prediction = predict(noisy, timesteps)
    loss = per_sample_loss(prediction, target, timesteps, scheduler, options, mask=mask)
    loss = loss * loss_weights.to(loss.device) * timestep_weights(timesteps, scheduler, options)
    return DiffusionLoss(loss.mean(), prediction, target)
