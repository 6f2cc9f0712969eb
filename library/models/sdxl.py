"""The SDXL family: load and save SDXL models (diffusers folders and SGM single files), offline.

``load_sdxl`` accepts what kohya's ``sdxl_train_network.py --pretrained_model_name_or_path`` accepts:
a diffusers SDXL folder or a ``.safetensors``/``.ckpt`` file in Stability's SGM layout. Single-file
configs are built from the weights (``sgm_conversion``); both tokenizers come from the folder or
kohya's ``--tokenizer_cache_dir`` layout. An SD1/SD2 model given here (or an SDXL model given to the
SD1/SD2 loader) is refused with one line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.errors import CheckpointError, TokenizerNotFoundError
from library.fileio import read_state_dict
from library.models import ldm_architecture as ldm_arch
from library.models import ldm_conversion as conv
from library.models import sgm_conversion as sgm
from library.models.families import ModelFamily, make_training_scheduler
from library.models.narrow_weights import folder_load_dtype
from library.models.stable_diffusion import dtype_by_part, settle_dtypes, write_pipeline_folder, write_single_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SDXLFamily(ModelFamily):
    """SDXL: two text encoders (CLIP-L, OpenCLIP bigG), pooled text and size conditioning, SGM files."""

    tokenizer_2_hub_id: str = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"

    @property
    def tokenizer_2_folder(self) -> str:
        return self.tokenizer_2_hub_id.replace("/", "_")


SDXL = SDXLFamily(
    name="sdxl",
    base_model_version="sdxl_base_v1-0",  # kohya's ss_base_model_version for SDXL
    tokenizer_hub_id="openai/clip-vit-large-patch14",
    text_encoder_to_ldm=sgm.text_encoder_1_to_sgm,
    modelspec_architectures=("stable-diffusion-xl-v1-base", "stable-diffusion-xl-v1-base"),
    kohya_text_encoder_prefixes=("lora_te1", "lora_te2"),
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    default_resolution=1024,
)


@dataclass
class SDXLModel:
    """The parts of an SDXL checkpoint that training and export need."""

    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    source: str
    extra_ldm_state: dict[str, torch.Tensor] = field(default_factory=dict)
    v2: bool = False
    v_parameterization: bool = False

    @property
    def family(self) -> SDXLFamily:
        return SDXL

    @property
    def base_model_version(self) -> str:
        return SDXL.version(self.v_parameterization)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]


def is_sdxl_unet_config(config) -> bool:
    return config.get("addition_embed_type") == "text_time"


def is_sdxl_model_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an SDXL model, told before loading it (scripts that take either family
    choose their checks and data layout from it). A missing path is not SDXL; its loader reports it.

    Folders: ``text_encoder_2/``; ``.safetensors`` files: the tensor names alone (nothing is read);
    torch checkpoints are mapped, not read (legacy pre-zip ones are read whole).
    """
    path = Path(path)
    if path.is_dir():
        return (path / "text_encoder_2").is_dir()
    if not path.is_file():
        return False
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception:  # not a safetensors file: the loader reports it in its own words
            return False
        return sgm.LABEL_EMBEDDING in keys or any(k.startswith("conditioner.embedders.") for k in keys)
    try:
        return sgm.checkpoint_family(read_state_dict(path)) == "sdxl"
    except CheckpointError:
        return False


def load_sdxl(
    path: str | os.PathLike,
    *,
    tokenizer_cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    keep_extra_state: bool = False,
    vae_dtype: torch.dtype | None = None,
    mmap: bool = True,
    device: torch.device | str | None = None,
    keep_narrow: bool = False,
) -> SDXLModel:
    """Both text encoders, VAE, UNet, both tokenizers and the training noise scheduler, offline.

    ``mmap``, ``device`` and ``keep_narrow``: as :func:`library.models.stable_diffusion.load_stable_diffusion`.
    """
    path = Path(path)
    if path.is_dir():
        model = _load_folder(path, dtype, vae_dtype or dtype, keep_narrow)
    elif path.is_file():
        reading = {"mmap": mmap, "device": device, "vae_dtype": vae_dtype, "keep_narrow": keep_narrow}
        model = _load_single_file(path, tokenizer_cache_dir, dtype, keep_extra_state, reading)
    else:
        raise CheckpointError(f"model '{path}' not found: pass a diffusers SDXL folder or a .safetensors/.ckpt file")
    for module in (model.text_encoder, model.text_encoder_2, model.vae, model.unet):
        module.requires_grad_(False).eval()
    return model


def _load_folder(path: Path, dtype, vae_dtype, keep_narrow: bool) -> SDXLModel:
    if not (path / "unet" / "config.json").is_file():
        raise CheckpointError(f"'{path}' is not a diffusers Stable Diffusion folder (no unet/config.json)")
    if not (path / "text_encoder_2" / "config.json").is_file():
        raise CheckpointError(f"'{path}' is an SD1.x/SD2.x folder (no text_encoder_2): this script trains SDXL")

    def load_dtype(part: str, requested):
        return folder_load_dtype(path / part, requested, keep_narrow)

    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=load_dtype("unet", dtype))
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=load_dtype("vae", vae_dtype))
        te1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=load_dtype("text_encoder", dtype))
        te2 = CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", dtype=load_dtype("text_encoder_2", dtype)
        )
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load diffusers folder '{path}': {str(err).splitlines()[0]}") from err
    if keep_narrow:
        settle_dtypes(((unet, dtype), (vae, vae_dtype), (te1, dtype), (te2, dtype)), keep_narrow)
    tokenizers = [_tokenizer_from(path / name, f"diffusers folder '{path}'") for name in ("tokenizer", "tokenizer_2")]
    return SDXLModel(te1, te2, vae, unet, *tokenizers, make_training_scheduler(False), str(path))


def _load_single_file(path: Path, tokenizer_cache_dir, dtype, keep_extra: bool, reading: dict) -> SDXLModel:
    # each tensor is cast as it is read (kept tensors stay as stored, for a bit-exact round trip)
    vae_dtype = reading.pop("vae_dtype", None) or dtype
    keep_narrow = reading.pop("keep_narrow", False)
    dtype_for = None if keep_extra or dtype is None else dtype_by_part(dtype, vae_dtype, keep_narrow)
    state_dict = read_state_dict(path, dtype=dtype_for, **reading)
    family = sgm.checkpoint_family(state_dict)
    if family != "sdxl":
        what = "is an SD1.x/SD2.x checkpoint" if family else "holds no Stable Diffusion UNet (model.diffusion_model.*)"
        raise CheckpointError(f"'{path}' {what}: this script needs an SDXL model")
    tokenizers = load_sdxl_tokenizers(tokenizer_cache_dir, path)
    arch, te2_config = sgm.infer_sdxl_architecture(state_dict)
    # The pooled output is read at the <EOS> token: the configs carry the tokenizers' special ids.
    te1_config, te2_config = (
        CLIPTextConfig(**config, **_special_ids(tokenizer))
        for config, tokenizer in zip((arch.text_config, te2_config), tokenizers)
    )
    unet_config = sgm.unet_config_from_sgm(arch, state_dict, te2_config.projection_dim)
    vae_config = ldm_arch.vae_config_from_ldm(arch, state_dict)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        te1 = CLIPTextModel(te1_config)
        te2 = CLIPTextModelWithProjection(te2_config)
    _assign(unet, sgm.convert_unet_from_sgm(state_dict, unet_config), path, "UNet")
    _assign(vae, conv.convert_vae_from_ldm(state_dict, vae_config), path, "VAE")
    te1_state, te2_state = sgm.convert_text_encoders_from_sgm(state_dict, te2)
    for module, state, part in ((te1, te1_state, "text encoder 1"), (te2, te2_state, "text encoder 2")):
        keys = set(module.state_dict())
        _assign(module, {k: v for k, v in state.items() if k in keys}, path, part)
    if dtype is not None:
        settle_dtypes(((unet, dtype), (vae, vae_dtype), (te1, dtype), (te2, dtype)), keep_narrow)
    model = SDXLModel(te1, te2, vae, unet, *tokenizers, make_training_scheduler(False), str(path))
    if keep_extra:
        produced = set(sgm_state_dict(model))
        model.extra_ldm_state = {k: v for k, v in state_dict.items() if k not in produced}
    return model


def _special_ids(tokenizer: CLIPTokenizer) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _assign(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path, part: str) -> None:
    result = module.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys:
        raise CheckpointError(
            f"checkpoint '{path}' lacks {len(result.missing_keys)} {part} tensors (first: {result.missing_keys[0]})"
        )
    if result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint '{path}' has {part} tensors SDXL does not use ({result.unexpected_keys[0]})"
        )


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def _tokenizer_from(folder: Path, where: str) -> CLIPTokenizer:
    if not (folder / "vocab.json").is_file():
        raise TokenizerNotFoundError(f"{where} has no {folder.name}/vocab.json")
    return CLIPTokenizer.from_pretrained(folder)


def load_sdxl_tokenizers(
    tokenizer_cache_dir: str | os.PathLike | None, model_path: Path
) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """CLIP-L's and bigG's tokenizers from kohya's ``--tokenizer_cache_dir`` layout; never downloaded.

    Like kohya, the second tokenizer pads with token id 0 (``!``), as SDXL's ``tokenizer_2`` does.
    """
    if tokenizer_cache_dir is None:
        raise TokenizerNotFoundError(
            f"single-file SDXL checkpoint '{model_path}' needs --tokenizer_cache_dir DIR holding "
            f"DIR/{SDXL.tokenizer_folder}/ and DIR/{SDXL.tokenizer_2_folder}/ (or use a diffusers folder)"
        )
    base = Path(tokenizer_cache_dir)
    where = f"--tokenizer_cache_dir '{base}'"
    tokenizer = _tokenizer_from(base / SDXL.tokenizer_folder, where)
    tokenizer_2 = _tokenizer_from(base / SDXL.tokenizer_2_folder, where)
    tokenizer_2.pad_token = tokenizer_2.convert_ids_to_tokens(0)
    return tokenizer, tokenizer_2


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def sgm_state_dict(model: SDXLModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model in the SGM single-file layout (plus any extra tensors kept at load time)."""
    state = sgm.unet_to_sgm(model.unet.state_dict(), model.unet.config)
    state.update(conv.vae_to_ldm(model.vae.state_dict(), model.vae.config))
    state.update(sgm.text_encoder_1_to_sgm(model.text_encoder.state_dict()))
    state.update(sgm.text_encoder_2_to_sgm(model.text_encoder_2.state_dict()))
    state.update(model.extra_ldm_state)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def save_sgm_checkpoint(model: SDXLModel, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write a single-file SDXL checkpoint (``.safetensors`` or ``.ckpt``) that A1111/ComfyUI/kohya load."""
    write_single_file(sgm_state_dict(model, dtype), path)


def save_sdxl_diffusers_folder(model: SDXLModel, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write a diffusers folder that ``StableDiffusionXLPipeline.from_pretrained`` loads."""
    scheduler = EulerDiscreteScheduler.from_config(model.noise_scheduler.config, steps_offset=1)
    pipeline = StableDiffusionXLPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer,
        tokenizer_2=model.tokenizer_2,
        unet=model.unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    write_pipeline_folder(pipeline, out_dir, dtype)
