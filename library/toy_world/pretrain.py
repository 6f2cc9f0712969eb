"""Pretraining of the toy model: the VAE first, then the UNet and text encoder on its latents.

Plain loops rather than :class:`library.training.loop.TrainingRun`: the toy images are drawn on
the fly from their seed (no dataset folder, no epochs), and the VAE stage has no counterpart in
the training scripts. The diffusion stage uses the scripts' own loss (``diffusion_loss``: noise
schedule, noise, targets, Min-SNR weighting) and caption encoding, so what the pretrained model
learned is what the suite's training code teaches.

Runs are deterministic for a given seed, step count and torch thread count: images come from
``generator.image_rng(seed, index)``, everything else from torch's generator seeded per stage.
A ``minutes`` cap stops a stage early (for timing and exploration; the result then depends on the
machine's speed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel

from library.models.stable_diffusion import StableDiffusionModel
from library.models.text_encoding import encode_tokens, tokenize_captions
from library.toy_world.generator import caption, combination_split, sample_images
from library.toy_world.model import PRETRAINING_NOISE_OFFSET, rescale_latents
from library.training.noise import NoiseOptions, diffusion_loss

# Image indices of the two stages and of evaluation never overlap (image i is a function of (seed, i)).
VAE_IMAGES_FROM = 0
VAE_CONTINUED_IMAGES_FROM = 5_000_000  # a second VAE stage (--vae_continue_from) sees new images
UNET_IMAGES_FROM = 10_000_000
EVAL_IMAGES_FROM = 20_000_000
INITIAL_LOGVAR = -6.0


@dataclass(frozen=True)
class PretrainPlan:
    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4  # per latent element, against per-pixel MSE on [-1, 1] images
    chroma_weight: float = 1.0  # weight of the colour-opponent part of the MSE (1: plain RGB MSE)
    unet_steps: int = 3000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    images_per_combination: int = 50  # the UNet's set: 60 pretraining combinations x 50 latents
    caption_dropout: float = 0.1  # empty captions teach the unconditional prediction CFG needs
    min_snr_gamma: float = 5.0
    noise_offset: float = PRETRAINING_NOISE_OFFSET  # kohya's --noise_offset (why: model.py)
    # An exponential moving average of the UNet and text encoder is what the stage returns (0: off):
    # samples of the averaged weights are steadier than those of the last step (diffusers' EMAModel).
    ema_decay: float = 0.0
    warmup_steps: int = 50
    minutes_per_stage: float | None = None


@dataclass
class StageLog:
    steps: int
    seconds: float
    losses: list[float]
    cpu_seconds: float = 0.0  # this process's CPU time: a load-independent measure of the cost

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1], the VAE's input range."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def tensor_to_images(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


# An orthonormal luminance / colour-opponent basis of RGB: MSE in it equals RGB MSE when unweighted.
OPPONENT = torch.tensor(
    [
        [3**-0.5, 3**-0.5, 3**-0.5],
        [2**-0.5, -(2**-0.5), 0.0],
        [6**-0.5, 6**-0.5, -2 * 6**-0.5],
    ]
)


def reconstruction_loss(decoded: torch.Tensor, pixels: torch.Tensor, chroma_weight: float) -> torch.Tensor:
    """MSE with the colour-opponent channels weighted: a small VAE learns luminance (shapes) long
    before colour under plain MSE; weighting colour up trades some shape for colour early on."""
    difference = torch.einsum("oc,bchw->bohw", OPPONENT.to(decoded), decoded - pixels)
    weights = torch.tensor([1.0, chroma_weight, chroma_weight]).to(decoded).view(1, 3, 1, 1)
    return (difference.pow(2) * weights).mean()


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _run_stage(
    step_fn: Callable[[int], torch.Tensor],
    parameters: list[torch.nn.Parameter],
    lr: float,
    steps: int,
    plan: PretrainPlan,
    report: Callable[[str], None],
    name: str,
    after_step: Callable[[], None] | None = None,
) -> StageLog:
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, steps, min(plan.warmup_steps, max(1, steps // 10)))
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    done = 0
    for step in range(steps):
        loss = step_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        done = step + 1
        elapsed = time.perf_counter() - start
        if done % 50 == 0 or done == steps:
            cpu = (time.process_time() - cpu_start) / done
            loss_text = f"loss {np.mean(losses[-50:]):.5f}"
            report(f"{name} step {done}/{steps} {loss_text} ({elapsed / done:.2f} s/step, {cpu:.2f} CPU s/step)")
        if plan.minutes_per_stage is not None and elapsed > 60 * plan.minutes_per_stage:
            report(f"{name}: time cap reached after {done} steps")
            break
    return StageLog(done, time.perf_counter() - start, losses, time.process_time() - cpu_start)


def pretrain_vae(
    vae: AutoencoderKL,
    plan: PretrainPlan,
    report: Callable[[str], None] = print,
    *,
    continued: bool = False,
    first_image: int = VAE_IMAGES_FROM,
    decoder_only: bool = False,
) -> StageLog:
    """Reconstruction (colour-weighted MSE) plus a small KL term on fresh images of the pretraining
    combinations. ``continued``: ``vae`` is an earlier stage's result, trained further on images
    from ``first_image`` on (so a second stage never sees the first stage's images again).
    ``decoder_only``: the encoder is frozen, so the latent space (and a UNet trained on it) stays
    valid while the decoder improves, as SD's own ft-MSE decoder was trained."""
    pretraining, _ = combination_split(plan.seed)
    vae.train().requires_grad_(True)
    if decoder_only:
        for part in (vae.encoder, vae.quant_conv):
            part.eval().requires_grad_(False)
    torch.manual_seed(plan.seed + int(continued))
    if not continued:
        with torch.no_grad():
            # Start from a posterior std of ~0.05 instead of 1: with unit noise on small initial means
            # the decoder sees mostly noise and learns several times slower (the KL term, weighted
            # lightly, then sets the variance it needs).
            vae.quant_conv.bias[vae.config.latent_channels :] += INITIAL_LOGVAR

    def step_fn(step: int) -> torch.Tensor:
        first = first_image + step * plan.vae_batch
        pixels = images_to_tensor([im for _, im in sample_images(pretraining, plan.vae_batch, plan.seed, first)])
        posterior = vae.encode(pixels).latent_dist
        decoded = vae.decode(posterior.sample()).sample
        loss = reconstruction_loss(decoded, pixels, plan.chroma_weight)
        if decoder_only:
            return loss
        kl = posterior.kl() / posterior.mean[0].numel()  # diffusers sums over the latent elements
        return loss + plan.kl_weight * kl.mean()

    parameters = [p for p in vae.parameters() if p.requires_grad]
    log = _run_stage(step_fn, parameters, plan.vae_lr, plan.vae_steps, plan, report, "vae")
    vae.eval().requires_grad_(False)
    return log


@torch.no_grad()
def encode_training_set(
    vae: AutoencoderKL, plan: PretrainPlan, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Posterior means and standard deviations (already times the scaling factor) and captions."""
    pretraining, _ = combination_split(plan.seed)
    count = plan.images_per_combination * len(pretraining)
    means, stds, captions = [], [], []
    for first in range(0, count, batch):
        drawn = sample_images(pretraining, min(batch, count - first), plan.seed, UNET_IMAGES_FROM + first)
        posterior = vae.encode(images_to_tensor([im for _, im in drawn])).latent_dist
        means.append(posterior.mean * vae.config.scaling_factor)
        stds.append(posterior.std * vae.config.scaling_factor)
        captions += [spec.caption for spec, _ in drawn]
    return torch.cat(means), torch.cat(stds), captions


def normalise_latent_scale(vae: AutoencoderKL, seed: int, per_combination: int = 4) -> float:
    """Rescale the VAE so scaled latents of the training images have unit standard deviation."""
    means, _, _ = encode_training_set(vae, PretrainPlan(seed=seed, images_per_combination=per_combination))
    factor = 1.0 / float(means.std())
    rescale_latents(vae, factor)
    return factor


def pretrain_diffusion(
    model: StableDiffusionModel, plan: PretrainPlan, report: Callable[[str], None] = print, *, round_index: int = 0
) -> StageLog:
    """UNet and text encoder together, epsilon prediction with the training scripts' noise code.

    ``round_index`` > 0 continues an earlier round's UNet and text encoder with other random draws."""
    means, stds, captions = encode_training_set(model.vae, plan)
    ids = tokenize_captions(model.tokenizer, captions)
    empty = tokenize_captions(model.tokenizer, [""])
    options = NoiseOptions(min_snr_gamma=plan.min_snr_gamma, noise_offset=plan.noise_offset or None)
    scheduler = model.noise_scheduler
    unet, text_encoder = model.unet, model.text_encoder
    for module in (unet, text_encoder):
        module.train().requires_grad_(True)
    torch.manual_seed(plan.seed + 1 + 1000 * round_index)

    def step_fn(step: int) -> torch.Tensor:
        pick = torch.randint(0, len(captions), (plan.unet_batch,))
        latents = means[pick] + stds[pick] * torch.randn_like(means[pick])
        batch_ids = ids[pick].clone()
        batch_ids[torch.rand(plan.unet_batch) < plan.caption_dropout] = empty[0]
        # Few distinct captions per batch: encode each once (the gradient reaches the same weights).
        unique, inverse = batch_ids.unique(dim=0, return_inverse=True)
        hidden = encode_tokens(text_encoder, unique)[inverse]

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return unet(noisy, timesteps, hidden).sample

        return diffusion_loss(predict, latents, scheduler, options, torch.ones(plan.unet_batch)).loss

    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(parameters, decay=plan.ema_decay) if plan.ema_decay > 0 else None
    after_step = (lambda: ema.step(parameters)) if ema is not None else None
    log = _run_stage(step_fn, parameters, plan.unet_lr, plan.unet_steps, plan, report, "unet", after_step)
    if ema is not None:
        ema.copy_to(parameters)
    for module in (unet, text_encoder):
        module.eval().requires_grad_(False)
    return log


def held_out_captions(seed: int) -> list[str]:
    return [caption(c, s) for c, s in combination_split(seed)[1]]
