"""One object per model family: what differs between SD1, SD2 (and later SDXL) in one place.

A family knows its checkpoints' single-file text-encoder layout, the tokenizer it expects, how a
prompt becomes the UNet's conditioning (one text encoder here; SDXL adds a second one and pooled
embeddings), its kohya names (``ss_base_model_version``, ModelSpec architecture, LoRA key
prefixes) and how its checkpoints are saved. Trainers ask the loaded model's ``family`` instead of
testing ``v2``, so a new family adds one object here, not a branch in every trainer. The DDPM
training schedule SD1 and SD2 share (``make_training_scheduler``) is here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from library.models import ldm_conversion as conv
from library.models.text_encoding import encode_tokens


def make_training_scheduler(v_parameterization: bool, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """kohya's DDPM schedule; ``zero_terminal_snr`` rescales betas (Lin et al. 2023, diffusers' rescale)."""
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
        rescale_betas_zero_snr=zero_terminal_snr,
    )


@dataclass(frozen=True)
class ModelFamily:
    """An SD model family. SD1 and SD2 share one loader (the version is read from the weights)."""

    name: str
    base_model_version: str  # kohya's ss_base_model_version, without the "_v" of v-prediction
    tokenizer_hub_id: str  # kohya's --tokenizer_cache_dir folder is this with "/" -> "_"
    text_encoder_to_ldm: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    modelspec_architectures: tuple[str, str]  # (epsilon-prediction, v-prediction)
    # kohya's LoRA key prefixes: one per text encoder (SDXL: lora_te1, lora_te2), then the UNet's.
    kohya_text_encoder_prefixes: tuple[str, ...] = ("lora_te",)
    kohya_unet_prefix: str = "lora_unet"
    modelspec_implementation: str = "diffusers"  # kohya: Stability's generative-models URL for SDXL
    default_resolution: int = 512  # modelspec.resolution without --resolution

    @property
    def tokenizer_folder(self) -> str:
        """The tokenizer's folder name in kohya's ``--tokenizer_cache_dir`` layout."""
        return self.tokenizer_hub_id.replace("/", "_")

    def version(self, v_parameterization: bool) -> str:
        """kohya's ``ss_base_model_version`` value."""
        return self.base_model_version + ("_v" if v_parameterization else "")

    def modelspec_architecture(self, v_parameterization: bool) -> str:
        return self.modelspec_architectures[int(v_parameterization)]

    def encode_prompt(
        self, text_encoders: list[torch.nn.Module], input_ids: torch.Tensor, clip_skip: int | None
    ) -> torch.Tensor:
        """Hidden states for token ids of ``text_encoding.tokenize_captions`` (one encoder in SD1/SD2)."""
        (text_encoder,) = text_encoders
        return encode_tokens(text_encoder, input_ids.to(text_encoder.device), clip_skip=clip_skip)

    def unet_conditioning(self, hidden_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """The UNet's keyword arguments besides sample and timestep (SDXL adds ``added_cond_kwargs``)."""
        return {"encoder_hidden_states": hidden_states}


SD1 = ModelFamily(
    name="sd1",
    base_model_version="sd_v1",
    tokenizer_hub_id="openai/clip-vit-large-patch14",
    text_encoder_to_ldm=conv.clip_to_ldm,
    modelspec_architectures=("stable-diffusion-v1", "stable-diffusion-v1"),
)
SD2 = ModelFamily(
    name="sd2",
    base_model_version="sd_v2",
    tokenizer_hub_id="stabilityai/stable-diffusion-2",
    text_encoder_to_ldm=conv.open_clip_to_ldm,
    modelspec_architectures=("stable-diffusion-v2-512", "stable-diffusion-v2-768-v"),
)


def family_of(v2: bool) -> ModelFamily:
    """The family of a loaded SD1.x/SD2.x checkpoint."""
    return SD2 if v2 else SD1
