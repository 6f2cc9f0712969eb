"""Score a toy model by reading its outputs with the pixel classifier.

Reconstruction: how well the VAE keeps what the classifier reads (and PSNR). Samples: for each
prompt ``a <colour> <shape>``, the fraction of seeded samples read back as that colour and that
shape. Every image is drawn from fixed seeds, so two models are compared on the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image

from library.models.stable_diffusion import StableDiffusionModel
from library.models.text_encoding import encode_tokens, tokenize_captions
from library.toy_world.classifier import classify
from library.toy_world.generator import SIZE, caption, sample_images
from library.toy_world.pretrain import EVAL_IMAGES_FROM, images_to_tensor, tensor_to_images
from library.training.sampling import make_sampler


@dataclass
class Accuracy:
    """Counts of correct readings; ``confusion`` maps (expected, read) to a count of the mistakes.

    ``hits`` keeps each sample's verdict (colour and shape right) in order, so two models scored on
    the same seeds can be compared sample by sample (a paired difference has a smaller error).
    """

    total: int = 0
    colour: int = 0
    shape: int = 0
    confusion: dict[tuple[str, str], int] = field(default_factory=dict)
    hits: list[bool] = field(default_factory=list)

    def add(self, colour: str, shape: str, image) -> None:
        reading = classify(image)
        self.total += 1
        self.colour += reading.colour == colour
        self.shape += reading.shape == shape
        self.hits.append(reading.colour == colour and reading.shape == shape)
        for expected, read in ((colour, reading.colour), (shape, reading.shape)):
            if expected != read:
                self.confusion[(expected, read)] = self.confusion.get((expected, read), 0) + 1

    @property
    def both(self) -> int:
        """Samples with colour and shape both right."""
        return sum(self.hits)

    def rates(self) -> dict[str, float]:
        n = max(self.total, 1)
        return {"colour": self.colour / n, "shape": self.shape / n, "both": self.both / n}


@torch.no_grad()
def reconstruction_report(
    vae: AutoencoderKL, combinations: list[tuple[str, str]], count: int, seed: int, batch: int = 64
) -> tuple[Accuracy, float]:
    """(classifier accuracy on decoded posterior means, PSNR in dB) over ``count`` fresh images."""
    accuracy, squared_error = Accuracy(), 0.0
    for first in range(0, count, batch):
        drawn = sample_images(combinations, min(batch, count - first), seed, EVAL_IMAGES_FROM + first)
        pixels = images_to_tensor([image for _, image in drawn])
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        squared_error += float(((decoded.clamp(-1, 1) - pixels) / 2).pow(2).sum())
        for (spec, _), image in zip(drawn, tensor_to_images(decoded)):
            accuracy.add(spec.colour, spec.shape, image)
    mse = squared_error / (count * 3 * pixels.shape[2] * pixels.shape[3])
    return accuracy, float(10 * np.log10(1.0 / max(mse, 1e-12)))


# The CFG scale every score uses. Measured on the committed model (240 samples of the pretraining
# prompts): colour 0.94 at 2, 0.90 at 2.5 and 3, 0.86 at 4; a stronger scale pushes hues past
# their neighbours (orange to yellow, red to orange). 3 keeps a margin for fine-tuned concepts.
SAMPLE_GUIDANCE = 3.0


@torch.no_grad()
def generate(
    model: StableDiffusionModel,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int = 20,
    guidance: float = SAMPLE_GUIDANCE,
    sampler: str = "euler",  # kohya's (and so our) DDIM clips x0 to [-1, 1], which cuts unit-std latents
    unet: torch.nn.Module | None = None,
    size: int = SIZE,
) -> list[Image.Image]:
    """One image per (prompt, seed), in one batch; the same seeds give the same starting noise.

    ``size`` is explicit: a VAE loaded from a single file carries SD's ``sample_size`` of 512, and
    sampling the 64 px toy model at 512 px is 80x slower and off its training distribution.
    """
    pipeline = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=unet or model.unet,
        scheduler=make_sampler(sampler, model.v_parameterization),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    embeds = encode_tokens(model.text_encoder, tokenize_captions(model.tokenizer, prompts + [""]))
    return pipeline(
        prompt_embeds=embeds[:-1],
        negative_prompt_embeds=embeds[-1:].expand(len(prompts), -1, -1),
        width=size,
        height=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
    ).images


def noise_seed(seed: int, index: int) -> int:
    """The starting-noise seed of sample ``index`` of a scored set drawn with ``seed``."""
    return seed * 100_003 + index


def sample_jobs(combinations: list[tuple[str, str]], per_combination: int, seed: int) -> list[tuple[str, str, int]]:
    """(colour, shape, noise seed) per sample, ``per_combination`` of each combination."""
    pairs = [(c, s) for _ in range(per_combination) for c, s in combinations]
    return [(c, s, noise_seed(seed, n)) for n, (c, s) in enumerate(pairs)]


def sample_report(
    model: StableDiffusionModel,
    combinations: list[tuple[str, str]],
    per_combination: int,
    seed: int,
    batch: int = 64,
    **sampling,
) -> Accuracy:
    """Classifier accuracy of ``per_combination`` seeded samples of each ``a <colour> <shape>``."""
    # One noise per sample: a seed shared by every prompt would make all of a round's samples fail
    # or succeed together (one starting noise drawn for 60 prompts), a far noisier estimate.
    jobs = sample_jobs(combinations, per_combination, seed)
    accuracy = Accuracy()
    for first in range(0, len(jobs), batch):
        chunk = jobs[first : first + batch]
        images = generate(model, [caption(c, s) for c, s, _ in chunk], [k for _, _, k in chunk], **sampling)
        for (colour, shape, _), image in zip(chunk, images):
            accuracy.add(colour, shape, image)
    return accuracy
