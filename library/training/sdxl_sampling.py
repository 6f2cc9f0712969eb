"""Sample images during SDXL training, as kohya's ``sdxl_train_network.py`` draws them.

Prompt files, sampler names, file names and the ``<output_dir>/sample/`` folder are
``library.training.sampling``'s; what differs is the pipeline (diffusers' ``StableDiffusionXLPipeline``
over the run's components) and the conditioning of kohya's SDXL sampling pipeline
(``sdxl_lpw_stable_diffusion``): each text encoder's penultimate hidden states with kohya's
``(word:1.2)`` weighting applied per encoder, bigG's pooled text of the first chunk, and size
numbers original = target = (h, w) with crop (0, 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from library.models.narrow_weights import place_keeping_narrow
from library.models.prompt_weighting import encode_sample_prompts
from library.models.sdxl import SDXLModel
from library.training.sampling import SamplePrompt, draw_samples, float32_decode


def encode_sdxl_sample_prompts(model: SDXLModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden ``(B, n*77, D1 + D2)``, pooled ``(B, P)``) of sample prompts, weighted as kohya samples them."""
    pooled: list[torch.Tensor] = []

    def encoder(text_encoder: torch.nn.Module, keep_pooled: bool):
        def encode_chunk(ids: torch.Tensor) -> torch.Tensor:
            out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
            if keep_pooled and not pooled:  # kohya: the first chunk's pooled text
                pooled.append(out.text_embeds)
            return out.hidden_states[-2]

        return encode_chunk

    tokenizer = model.tokenizer
    hidden_1 = encode_sample_prompts(
        tokenizer, encoder(model.text_encoder, False), texts, pad_token_id=tokenizer.pad_token_id
    )
    tokenizer_2 = model.tokenizer_2
    hidden_2 = encode_sample_prompts(
        tokenizer_2, encoder(model.text_encoder_2, True), texts, pad_token_id=tokenizer_2.pad_token_id
    )
    return torch.cat([hidden_1, hidden_2.to(hidden_1)], dim=-1), pooled[0]


def render_sdxl_samples(
    args: argparse.Namespace,
    device: torch.device,
    model: SDXLModel,
    unet: torch.nn.Module,
    prompts: list[SamplePrompt],
    epoch: int | None,
    step: int,
) -> list[tuple[Path, str]]:
    """kohya's SDXL sample images with ``unet`` (the network patched in): (file, prompt) pairs.

    The VAE decodes in float32 (SDXL's VAE overflows in float16) on ``device`` and goes back after.
    """
    vae_place = (model.vae.device, model.vae.dtype)
    place_keeping_narrow(model.vae, device, torch.float32)
    components = {
        "vae": model.vae,
        "text_encoder": model.text_encoder,
        "text_encoder_2": model.text_encoder_2,
        "tokenizer": model.tokenizer,
        "tokenizer_2": model.tokenizer_2,
        "unet": unet,
    }

    def build(scheduler) -> StableDiffusionXLPipeline:
        return StableDiffusionXLPipeline(**components, scheduler=scheduler, add_watermarker=False)

    def inputs(prompt: SamplePrompt) -> dict:
        hidden, pooled = encode_sdxl_sample_prompts(model, [prompt.prompt, prompt.negative_prompt])
        hidden, pooled = hidden.to(device, unet.dtype), pooled.to(device, unet.dtype)
        size = (prompt.height, prompt.width)
        return {
            "prompt_embeds": hidden[:1],
            "negative_prompt_embeds": hidden[1:],
            "pooled_prompt_embeds": pooled[:1],
            "negative_pooled_prompt_embeds": pooled[1:],
            "original_size": size,
            "target_size": size,
            "crops_coords_top_left": (0, 0),
        }

    try:
        paths = draw_samples(
            build,
            inputs,
            prompts,
            default_sampler=args.sample_sampler,
            v_parameterization=False,
            out_dir=Path(args.output_dir) / "sample",
            output_name=args.output_name,
            epoch=epoch,
            step=step,
            device=device,
            decode=float32_decode(model.vae),
        )
    finally:
        place_keeping_narrow(model.vae, *vae_place)
    return list(zip(paths, [prompt.prompt for prompt in prompts]))
