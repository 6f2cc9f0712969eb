"""SDXL network training (``sdxl_train_network.py``): ``NetworkTrainer`` with the SDXL family plugged in.

The loop, the tasks, saving, resume and metadata are ``train_network.py``'s; what differs is the
model (two text encoders and tokenizers, loaded by ``library.models.sdxl``), the conditioning
(penultimate hidden states of both encoders, pooled text and kohya's per-image size/crop numbers)
and kohya's ``--cache_text_encoder_outputs``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from library.data.buckets import SDXL_BUCKET_RESO_STEPS_MULTIPLE
from library.data.latent_cache import SDXL_NPZ_SUFFIX
from library.data.text_encoder_cache import TextOutputs, batch_text_outputs, cache_text_encoder_outputs
from library.models.families import make_training_scheduler
from library.models.sdxl import SDXLModel, load_sdxl
from library.models.sdxl_conditioning import encode_sdxl_prompt, sdxl_unet_conditioning, size_time_ids
from library.models.sgm_conversion import SDXL_VAE_SCALE_FACTOR
from library.models.stable_diffusion import load_vae
from library.models.text_encoding import tokenize_captions
from library.training.model_setup import enable_xformers, loading_options, weight_dtype
from library.training.network_trainer import NetworkTask, NetworkTrainer
from library.training.sdxl_args import verify_sdxl_training_args
from library.training.sdxl_sampling import render_sdxl_samples
from library.training.skeleton import RunInputs, TrainerSkeleton

logger = logging.getLogger(__name__)


def load_sdxl_training_model(
    args: argparse.Namespace, path: str | None = None, frozen_dtypes: bool = False
) -> SDXLModel:
    """``--pretrained_model_name_or_path`` (or ``path``) as SDXL, with ``--vae`` and the training schedule."""
    path = path or args.pretrained_model_name_or_path
    options = loading_options(args, frozen_dtypes)
    model = load_sdxl(path, tokenizer_cache_dir=args.tokenizer_cache_dir, **options)
    model.noise_scheduler = make_training_scheduler(False, args.zero_terminal_snr)
    if args.vae:
        model.vae = load_vae(args.vae)
        if Path(args.vae).is_file():  # a single file carries no config: SDXL's VAE scale
            model.vae.register_to_config(scaling_factor=SDXL_VAE_SCALE_FACTOR)
    return model


def sdxl_batch_conditioning(model: SDXLModel, batch: dict, device, dtype: torch.dtype) -> dict:
    """The UNet's keyword arguments for a batch, encoded by both text encoders (no cached outputs)."""
    encoders = (model.text_encoder, model.text_encoder_2)
    hidden, pooled = encode_sdxl_prompt(*encoders, batch["input_ids"], batch["input_ids2"])
    time_ids = size_time_ids(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"], device)
    return sdxl_unet_conditioning(hidden.to(dtype), pooled.to(dtype), time_ids.to(dtype))


class SDXLNetworkTask(NetworkTask):
    """A network step on SDXL: both text encoders (or their cached outputs) and size conditioning."""

    render_samples = staticmethod(render_sdxl_samples)

    def unet_conditioning(self, batch: dict) -> dict:
        model, device = self.model, self.accelerator.device
        if self.text_outputs is not None:
            hidden_1, hidden_2, pooled = batch_text_outputs(self.text_outputs, batch["image_keys"], device)
            hidden = torch.cat([hidden_1, hidden_2], dim=-1)
        else:
            with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
                hidden, pooled = encode_sdxl_prompt(
                    model.text_encoder, model.text_encoder_2, batch["input_ids"], batch["input_ids2"]
                )
        time_ids = size_time_ids(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"], device)
        dtype = model.unet.dtype
        return sdxl_unet_conditioning(hidden.to(dtype), pooled.to(dtype), time_ids.to(dtype))


class SDXLNetworkTrainer(NetworkTrainer):
    """kohya's ``SdxlNetworkTrainer``: ``SDXLNetworkTrainer(args).train()``."""

    task_class = SDXLNetworkTask
    log_name = "sdxl_network_train"
    bucket_reso_multiple = SDXL_BUCKET_RESO_STEPS_MULTIPLE

    def __init__(self, args):
        verify_sdxl_training_args(args)
        TrainerSkeleton.__init__(self, args)

    def load_models(self) -> SDXLModel:
        args = self.args
        model = load_sdxl_training_model(args, frozen_dtypes=True)
        if args.xformers:
            enable_xformers(model.unet)
        return model

    def tokenizers(self, model: SDXLModel) -> list:
        return [model.tokenizer, model.tokenizer_2]

    def before_latents(self, inputs: RunInputs) -> None:
        for group in (inputs.group, inputs.validation):
            if group is not None:
                group.latent_cache_suffix = SDXL_NPZ_SUFFIX

    def cache_text_outputs(self, inputs: RunInputs) -> dict[str, TextOutputs]:
        """Encode every caption once with the frozen encoders (placed by ``build_task``), as kohya does."""
        model, accelerator, args = inputs.model, inputs.accelerator, self.args

        def encode(captions: list[str]) -> TextOutputs:
            ids = [tokenize_captions(t, captions, args.max_token_length) for t in self.tokenizers(model)]
            with accelerator.autocast():
                hidden, pooled = encode_sdxl_prompt(model.text_encoder, model.text_encoder_2, *ids)
            width = model.text_encoder.config.hidden_size
            return hidden[..., :width], hidden[..., width:], pooled

        cache = cache_text_encoder_outputs(
            [inputs.group, inputs.validation], encode, to_disk=args.cache_text_encoder_outputs_to_disk,
            text_encoders=model.text_encoders,
        )  # fmt: skip
        accelerator.wait_for_everyone()
        logger.info("cached text encoder outputs of %d images (%s)", len(cache), weight_dtype(args))
        return cache
