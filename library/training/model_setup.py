"""The model a run trains on: loaded with kohya's model flags, placed in its dtypes, latents cached.

One loader for every trainer and every compression stage, so that ``--vae``, ``--zero_terminal_snr``,
``--v2``/``--v_parameterization`` and ``--tokenizer_cache_dir`` mean the same everywhere; one rule
for the dtypes frozen weights, the VAE and saved files take.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

from library.data.dataset_group import DatasetGroup
from library.errors import ConfigError
from library.models.families import make_training_scheduler
from library.models.narrow_weights import place_keeping_narrow
from library.models.stable_diffusion import StableDiffusionModel, load_stable_diffusion, load_vae

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def loading_options(args: argparse.Namespace, frozen_dtypes: bool = False) -> dict:
    """kohya's loading flags: ``--disable_mmap_load_safetensors`` (plain reads) and ``--lowram`` (straight
    onto the accelerator, so host RAM never holds the weights; kohya's meaning, for GPU-rich machines).

    ``frozen_dtypes``: read every tensor straight into the dtype it is trained in (the frozen weights'
    mixed-precision dtype, the VAE's), so a fp16 file never sits beside its cast copy; in a float32 run
    the fp16/bf16 weights of linear and conv layers stay as stored and are widened per use, which is
    exact (:mod:`library.models.narrow_weights`), at the cost of widening them again every step.
    Not with ``--highvram`` (kohya's "memory is plentiful": the float32 copies, no widening) nor
    ``--base_weights`` (merging into them would round the merged weights to the file's precision).
    """
    device = None
    if getattr(args, "lowram", False):
        from accelerate import PartialState

        device = PartialState().device  # the device the Accelerator made next will train on
    options = {"mmap": not getattr(args, "disable_mmap_load_safetensors", False), "device": device}
    if frozen_dtypes:
        keep_narrow = not (getattr(args, "base_weights", None) or getattr(args, "highvram", False))
        options.update(dtype=weight_dtype(args), vae_dtype=vae_dtype(args), keep_narrow=keep_narrow)
    return options


def load_training_model(
    args: argparse.Namespace, path: str | None = None, frozen_dtypes: bool = False
) -> StableDiffusionModel:
    """``--pretrained_model_name_or_path`` (or ``path``) with kohya's model flags and training schedule.

    ``frozen_dtypes``: load in the dtypes the run keeps frozen weights in (see :func:`loading_options`).
    """
    model = load_stable_diffusion(
        path or args.pretrained_model_name_or_path,
        v2=args.v2 or None,
        v_parameterization=args.v_parameterization or None,
        tokenizer_cache_dir=args.tokenizer_cache_dir,
        **loading_options(args, frozen_dtypes),
    )
    model.noise_scheduler = make_training_scheduler(model.v_parameterization, args.zero_terminal_snr)
    if args.vae:
        model.vae = load_vae(args.vae)
    return model


def weight_dtype(args: argparse.Namespace) -> torch.dtype:
    """Frozen weights run in the mixed-precision dtype (kohya's memory saving)."""
    return WEIGHT_DTYPES[args.mixed_precision]


def vae_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.float32 if args.no_half_vae else weight_dtype(args)


def trained_dtype(args: argparse.Namespace) -> torch.dtype:
    """Trained weights stay float32 unless --full_fp16/--full_bf16."""
    return weight_dtype(args) if (args.full_fp16 or args.full_bf16) else torch.float32


def place_frozen(args: argparse.Namespace, device: torch.device, *modules: torch.nn.Module) -> None:
    """Frozen modules onto ``device`` in the mixed-precision dtype (narrow weights stay narrow)."""
    for module in modules:
        place_keeping_narrow(module, device, weight_dtype(args))


def enable_gradient_checkpointing(unet: torch.nn.Module, *text_encoders: torch.nn.Module) -> None:
    """Checkpoint the UNet's blocks, and the layers of the text encoders given (those whose network trains).

    The text encoder's checkpoints are non-reentrant: they pass gradients to a network's weights
    inside a layer although the layer's inputs (the token embeddings) need none. transformers'
    default reentrant ones do not, which silently left a text encoder's LoRA untrained; kohya makes
    the embeddings require grad instead. diffusers' UNet checkpoints are non-reentrant already.
    """
    unet.enable_gradient_checkpointing()
    for text_encoder in text_encoders:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        text_encoder.train()  # transformers checkpoints only in training mode (CLIP has no dropout)


def enable_xformers(*unets: torch.nn.Module) -> None:
    try:
        for unet in unets:
            unet.enable_xformers_memory_efficient_attention()
    except (ImportError, ModuleNotFoundError, ValueError) as err:
        raise ConfigError(f"--xformers: {err}; the default SDPA attention needs no extra package") from err


def prepare_latents(
    args: argparse.Namespace, accelerator: Accelerator, model: StableDiffusionModel, groups: list[DatasetGroup | None]
) -> None:
    """Cache latents (then the VAE leaves the accelerator), or keep the VAE there for encoding."""
    dtype = vae_dtype(args)
    place_keeping_narrow(model.vae, accelerator.device, dtype)
    if not args.cache_latents:
        return
    for group in groups:
        if group is None:
            continue
        group.cache_latents(
            model.vae,
            vae_batch_size=args.vae_batch_size,
            to_disk=args.cache_latents_to_disk,
            device=accelerator.device,
            dtype=dtype,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
        )
    model.vae.to("cpu")
    accelerator.wait_for_everyone()
