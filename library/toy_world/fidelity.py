"""How close a compressed model stays to its original on the toy world: samples and predictions.

A distilled student or a model with narrowed FFNs is meant to *behave like* its original, so
besides what the classifier reads from its samples, two distances to the original are measured on
identical inputs:

* sample fidelity: the same prompts from the same starting noise, decoded by the same VAE; pixel
  MSE (images in [0, 1]) and the PSNR of that MSE. Two UNets that predicted the same noise draw
  identical images, so this is what a user sees of the difference.
* prediction MSE: the UNets' noise predictions on fixed noisy latents of fresh toy images (fixed
  timesteps, noise and captions); no sampler in between, so small changes show without sampling
  noise. This is the quantity output KD minimises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from library.models.stable_diffusion import StableDiffusionModel
from library.models.text_encoding import encode_tokens, tokenize_captions
from library.toy_world.evaluate import Accuracy, generate
from library.toy_world.generator import caption, sample_images
from library.toy_world.pretrain import images_to_tensor

# Image indices apart from pretraining, evaluation and the DreamBooth sets (library.toy_world.concept).
FIDELITY_IMAGES_FROM = 32_000_000
PREDICTION_TIMESTEPS = (50, 250, 500, 750, 950)


@dataclass
class SampleSet:
    """Seeded samples of ``a <colour> <shape>`` prompts: what was asked, and the images as floats in [0, 1]."""

    jobs: list[tuple[str, str, int]]  # (colour, shape, seed)
    pixels: np.ndarray  # (n, 64, 64, 3) float32

    def accuracy(self) -> Accuracy:
        accuracy = Accuracy()
        for (colour, shape, _), image in zip(self.jobs, self.pixels):
            accuracy.add(colour, shape, (image * 255).round().astype(np.uint8))
        return accuracy


@dataclass(frozen=True)
class Fidelity:
    """Pixel MSE of one sample set against another drawn from the same noise, and its PSNR in dB."""

    mse: float
    psnr: float


def draw_samples(
    model: StableDiffusionModel,
    jobs: list[tuple[str, str, int]],
    unet: torch.nn.Module | None = None,
    batch: int = 64,
    **sampling,
) -> SampleSet:
    """The samples of ``jobs`` drawn with ``unet`` in place of the model's (its text encoder and VAE kept)."""
    images = []
    for first in range(0, len(jobs), batch):
        chunk = jobs[first : first + batch]
        drawn = generate(model, [caption(c, s) for c, s, _ in chunk], [k for _, _, k in chunk], unet=unet, **sampling)
        images += [np.asarray(image, dtype=np.float32) / 255.0 for image in drawn]
    return SampleSet(list(jobs), np.stack(images))


def fidelity(samples: SampleSet, reference: SampleSet) -> Fidelity:
    """Pixel MSE and PSNR of ``samples`` against ``reference``; both must come from the same jobs."""
    if samples.jobs != reference.jobs:
        raise ValueError("fidelity compares samples drawn for the same prompts and seeds")
    mse = float(np.mean((samples.pixels.astype(np.float64) - reference.pixels) ** 2))
    return Fidelity(mse, float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse)))


@dataclass
class PredictionBatch:
    """Fixed UNet inputs: noisy latents, their timesteps and the caption embeddings."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor


@torch.no_grad()
def prediction_batch(
    model: StableDiffusionModel, combinations: list[tuple[str, str]], count: int, seed: int
) -> PredictionBatch:
    """``count`` fresh toy images of ``combinations``, encoded, noised at spread timesteps with fixed noise."""
    drawn = sample_images(combinations, count, seed, FIDELITY_IMAGES_FROM)
    generator = torch.Generator().manual_seed(seed)
    posterior = model.vae.encode(images_to_tensor([image for _, image in drawn])).latent_dist
    latents = posterior.mean * model.vae.config.scaling_factor
    timesteps = torch.tensor([PREDICTION_TIMESTEPS[i % len(PREDICTION_TIMESTEPS)] for i in range(count)])
    noise = torch.randn(latents.shape, generator=generator)
    noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
    context = encode_tokens(model.text_encoder, tokenize_captions(model.tokenizer, [s.caption for s, _ in drawn]))
    return PredictionBatch(noisy, timesteps, context)


@torch.no_grad()
def prediction_mse(unet: torch.nn.Module, reference: torch.nn.Module, batch: PredictionBatch) -> float:
    """Mean squared difference of two UNets' predictions on the same inputs (float32)."""
    inputs = (batch.noisy, batch.timesteps, batch.context)
    found = unet(*inputs).sample.float()
    expected = reference(*inputs).sample.float()
    return float(torch.nn.functional.mse_loss(found, expected))
