"""DreamBooth on the toy world, judged by what the trained model draws.

``train_network.py`` runs with the flags a kohya user would pass (the instance and class folders
of :mod:`library.toy_world.concept`, ``--prior_loss_weight``, cached latents); the saved network
is then applied to a fresh copy of the base model with its own module's
``create_network_from_weights``, as a consumer would, and seeded samples are read by the pixel
classifier. Concept accuracy: samples of ``a <token> <shape>`` read as the concept's colour and
shape. Prior preservation: accuracy on the same shape in the colours the base model knows, and on
other pretraining prompts, compared with the base model's own.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from library.models.stable_diffusion import StableDiffusionModel, load_stable_diffusion
from library.toy_world.concept import Concept
from library.toy_world.evaluate import Accuracy, generate, noise_seed
from library.toy_world.generator import caption, combination_split
from library.toy_world.model import PRETRAINING_NOISE_OFFSET


@dataclass(frozen=True)
class DreamBoothRun:
    """What one training run varies; the rest is fixed so runs compare."""

    network_module: str = "networks.lora"
    network_dim: int = 4
    network_alpha: float = 4.0
    network_args: tuple[str, ...] = ()
    learning_rate: float = 1e-3
    max_train_steps: int = 200
    train_batch_size: int = 4
    seed: int = 0
    # Fine-tune with the offset the base model was pretrained with (kohya users pass the same flag).
    noise_offset: float = PRETRAINING_NOISE_OFFSET
    # kohya's --caption_dropout_rate. The base was pretrained with 10% empty captions and is sampled
    # with CFG: without dropout only the conditional prediction learns the concept, the unconditional
    # one drifts with it, and guidance pushes samples away from the concept (docs/quality.md).
    caption_dropout_rate: float = 0.1
    # kohya's default: the network trains the text encoder too. On the toy model a UNet-only LoRA
    # needs several times the steps to bind "sks" (80% at 600 steps and twice the lr, against 100)
    # and moves the priors further (docs/quality.md).
    train_text_encoder: bool = True
    # kohya's --prior_loss_weight (the weight of the regularisation images' loss). 1 is kohya's default
    # and the bench's; 4 with the concept set's wider prior folder, cosine lr and 600 steps keeps both
    # priors within 5 points of the base at five of five training seeds (bench/quality_prior.py,
    # docs/quality.md "Prior preservation on a larger prior set").
    prior_loss_weight: float = 1.0
    # kohya's --lr_scheduler. Constant lr 1e-3 makes single checkpoints swing (concept 0.03 at step
    # 150, 0.81 at 200 in one run); cosine ends each run at a settled state.
    lr_scheduler: str = "constant"


def train_network_argv(
    model: str | os.PathLike,
    tokenizers: str | os.PathLike,
    concept_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    run: DreamBoothRun,
    output_name: str = "concept",
) -> list[str]:
    """kohya's flags for a DreamBooth LoRA on the concept folders (``img/`` and ``reg/``)."""
    argv = [
        f"--pretrained_model_name_or_path={model}",
        f"--tokenizer_cache_dir={tokenizers}",
        f"--train_data_dir={Path(concept_dir) / 'img'}",
        f"--reg_data_dir={Path(concept_dir) / 'reg'}",
        "--caption_extension=.txt",
        "--resolution=64",
        f"--prior_loss_weight={run.prior_loss_weight}",
        "--cache_latents",
        f"--network_module={run.network_module}",
        f"--network_dim={run.network_dim}",
        f"--network_alpha={run.network_alpha}",
        f"--learning_rate={run.learning_rate}",
        f"--lr_scheduler={run.lr_scheduler}",
        "--optimizer_type=AdamW",
        f"--max_train_steps={run.max_train_steps}",
        f"--train_batch_size={run.train_batch_size}",
        f"--seed={run.seed}",
        f"--noise_offset={run.noise_offset}",
        f"--caption_dropout_rate={run.caption_dropout_rate}",
        "--max_data_loader_n_workers=0",
        f"--output_dir={output_dir}",
        f"--output_name={output_name}",
        "--save_model_as=safetensors",
    ]
    if not run.train_text_encoder:
        argv.append("--network_train_unet_only")
    if run.network_args:
        argv += ["--network_args", *run.network_args]
    return argv


def load_base(model: str | os.PathLike, tokenizers: str | os.PathLike) -> StableDiffusionModel:
    """The base model in float32 and eval mode, as sampling wants it."""
    loaded = load_stable_diffusion(model, tokenizer_cache_dir=tokenizers)
    for module in (loaded.text_encoder, loaded.vae, loaded.unet):
        # .float(), not .to(torch.float32): diffusers' ModelMixin.to warns on every dtype cast.
        module.float().eval().requires_grad_(False)
    return loaded


def apply_network_file(model: StableDiffusionModel, path: str | os.PathLike, network_module: str) -> None:
    """Attach a saved network to ``model`` through its module's kohya entry point (as a consumer does)."""
    module = importlib.import_module(network_module)
    network, weights = module.create_network_from_weights(1.0, path, model.vae, model.text_encoder, model.unet)
    network.apply_to(model.text_encoder, model.unet)
    network.load_state_dict(weights, strict=False)
    network.to(torch.float32).eval().requires_grad_(False)


# (prompt, expected colour, expected shape): one scored sample.
Job = tuple[str, str, str]
# Each scored set draws its noise from its own seed (``seed + offset``), so sets never share samples.
REPORT_SEED_OFFSETS = {"concept": 0, "class_prior": 1, "other_prior": 2}


def score_prompts(model: StableDiffusionModel, jobs: list[Job], seed: int, steps: int) -> Accuracy:
    """``jobs``: (prompt, expected colour, expected shape); one sample each, seeds from ``seed``."""
    accuracy = Accuracy()
    for first in range(0, len(jobs), 64):
        chunk = jobs[first : first + 64]
        seeds = [noise_seed(seed, first + i) for i in range(len(chunk))]
        images = generate(model, [prompt for prompt, _, _ in chunk], seeds, steps=steps)
        for (_, colour, shape), image in zip(chunk, images):
            accuracy.add(colour, shape, image)
    return accuracy


def report_jobs(
    concept: Concept,
    seed: int,
    concept_samples: int,
    class_samples: int,
    other_samples: int,
    all_other_prompts: bool = False,
) -> dict[str, list[Job]]:
    """The samples a concept report draws, by set: ``concept_samples`` of the concept prompt,
    ``class_samples`` of the class shape in each colour the base model knows it in, and
    ``other_samples`` of each other-shape pretraining prompt (every fifth of them, or all)."""
    pretraining, _ = combination_split(seed)
    others = concept.other_combinations(seed)
    if not all_other_prompts:
        others = others[:: max(1, len(pretraining) // 12)]
    shape, known = concept.shape, concept.class_colours(seed)
    return {
        "concept": [(concept.prompt, concept.colour, shape)] * concept_samples,
        "class_prior": [(caption(c, shape), c, shape) for c in known for _ in range(class_samples)],
        "other_prior": [(caption(c, s), c, s) for c, s in others for _ in range(other_samples)],
    }


def score_report(
    model: StableDiffusionModel, jobs: dict[str, list[Job]], seed: int, steps: int = 20
) -> dict[str, Accuracy]:
    """Each set of :func:`report_jobs` sampled and read; the same ``seed`` gives every model the same noise."""
    return {name: score_prompts(model, jobs[name], seed + REPORT_SEED_OFFSETS[name], steps) for name in jobs}


def concept_report(
    model: StableDiffusionModel, concept: Concept, samples: int, seed: int = 0, steps: int = 20
) -> dict[str, float]:
    """Concept accuracy (both words right) and prior accuracy (the class's known colours and every
    fifth other-shape pretraining prompt), ``samples`` concept samples and a quarter as many per prior prompt."""
    per_prompt = max(1, samples // 4)
    scored = score_report(model, report_jobs(concept, seed, samples, per_prompt, per_prompt), seed, steps)
    concept_rates = scored["concept"].rates()
    return {
        "concept": concept_rates["both"],
        "concept_colour": concept_rates["colour"],
        "class_prior": scored["class_prior"].rates()["both"],
        "other_prior": scored["other_prior"].rates()["both"],
    }
