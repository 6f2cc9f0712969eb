"""Load and save SD1.x/SD2.x models: diffusers folders and single-file LDM checkpoints, offline.

``load_stable_diffusion`` is the one entry point the scripts use; it accepts what kohya's
``--pretrained_model_name_or_path`` accepts (a diffusers folder or a ``.safetensors``/``.ckpt``
file) and needs no network: single-file configs are built from the weights, tokenizers come from
the diffusers folder or kohya's ``--tokenizer_cache_dir`` layout.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from library.errors import CheckpointError, TokenizerNotFoundError
from library.fileio import atomic_directory, atomic_path, read_state_dict, save_state_dict
from library.models import ldm_architecture as ldm_arch
from library.models import ldm_conversion as conv
from library.models import sgm_conversion as sgm
from library.models.families import ModelFamily, family_of, make_training_scheduler
from library.models.narrow_weights import folder_load_dtype, keep_weights_narrow
from library.models.unet_variants import variant_of

logger = logging.getLogger(__name__)


@dataclass
class StableDiffusionModel:
    """The parts of an SD1.x/SD2.x checkpoint that training and export need."""

    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    v2: bool
    v_parameterization: bool
    source: str
    # LDM tensors that have no diffusers counterpart (EMA weights, SD2's unused last OpenCLIP
    # layer, ...). Kept only when asked, so that a single-file round trip is bit-exact.
    extra_ldm_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def family(self) -> ModelFamily:
        return family_of(self.v2)

    @property
    def base_model_version(self) -> str:
        """kohya's ``ss_base_model_version`` value."""
        return self.family.version(self.v_parameterization)

    def encode_prompt(self, input_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
        """The UNet's text conditioning for token ids of ``text_encoding.tokenize_captions``."""
        return self.family.encode_prompt([self.text_encoder], input_ids, clip_skip)


def load_stable_diffusion(
    path: str | os.PathLike,
    *,
    v2: bool | None = None,
    v_parameterization: bool | None = None,
    tokenizer_cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    keep_extra_state: bool = False,
    vae_dtype: torch.dtype | None = None,
    mmap: bool = True,
    device: torch.device | str | None = None,
    keep_narrow: bool = False,
) -> StableDiffusionModel:
    """Load text encoder, VAE, UNet, tokenizer and noise scheduler from a folder or a single file.

    ``v2`` and ``v_parameterization`` mirror kohya's flags. A single file's SD version is read
    from its text encoder and a mismatching ``--v2`` is reported; v-prediction cannot be seen in
    the weights, so it comes from the flag or from a ``<checkpoint>.yaml`` beside the file.
    Modules are built on the meta device and take the file's tensors as they are (no second copy);
    ``dtype`` (``vae_dtype`` for the VAE) converts each tensor as it is read; ``mmap=False`` and
    ``device`` are kohya's ``--disable_mmap_load_safetensors`` and ``--lowram``
    for single files (diffusers folders load tensor by tensor through diffusers/transformers).
    ``keep_narrow``: where a part's dtype is float32, the fp16/bf16 weights of its frozen linear and conv
    layers stay as stored and are widened per use (:mod:`library.models.narrow_weights`; exact).
    """
    path = Path(path)
    if path.is_dir():
        model = _load_diffusers_folder(path, v2, v_parameterization, dtype, vae_dtype or dtype, keep_narrow)
    elif path.is_file():
        reading = {"mmap": mmap, "device": device, "vae_dtype": vae_dtype, "keep_narrow": keep_narrow}
        model = _load_single_file(path, v2, v_parameterization, tokenizer_cache_dir, dtype, keep_extra_state, reading)
    else:
        raise CheckpointError(
            f"model '{path}' not found: pass a diffusers folder or a .safetensors/.ckpt file "
            "(hub ids are not downloaded: this suite works offline)"
        )
    for module in (model.text_encoder, model.vae, model.unet):
        module.requires_grad_(False).eval()
    return model


def _load_diffusers_folder(path: Path, v2, v_parameterization, dtype, vae_dtype, keep_narrow) -> StableDiffusionModel:
    if not (path / "unet" / "config.json").is_file():
        raise CheckpointError(f"'{path}' is not a diffusers Stable Diffusion folder (no unet/config.json)")
    if (path / "text_encoder_2").is_dir():
        raise CheckpointError(f"'{path}' is an SDXL folder: train it with sdxl_train_network.py")
    try:
        unet = _load_unet_folder(path / "unet", folder_load_dtype(path / "unet", dtype, keep_narrow))
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", torch_dtype=folder_load_dtype(path / "vae", vae_dtype, keep_narrow)
        )
        text_encoder = CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", dtype=folder_load_dtype(path / "text_encoder", dtype, keep_narrow)
        )
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load diffusers folder '{path}': {str(err).splitlines()[0]}") from err
    if keep_narrow:
        settle_dtypes(((unet, dtype), (vae, vae_dtype), (text_encoder, dtype)), keep_narrow)
    detected_v2 = text_encoder.config.hidden_act == "gelu"
    v2 = _reconcile_v2(v2, detected_v2, path)
    if v_parameterization is None:
        scheduler_config = path / "scheduler" / "scheduler_config.json"
        prediction = (
            json.loads(scheduler_config.read_text()).get("prediction_type") if scheduler_config.is_file() else None
        )
        v_parameterization = prediction == "v_prediction"
    tokenizer = _load_tokenizer_folder(path / "tokenizer", path)
    return StableDiffusionModel(
        text_encoder,
        vae,
        unet,
        tokenizer,
        make_training_scheduler(v_parameterization),
        v2,
        v_parameterization,
        str(path),
    )


def _load_unet_folder(folder: Path, dtype: torch.dtype | None) -> UNet2DConditionModel:
    """A stock diffusers UNet, or a variant a feature registered (e.g. narrowed FFNs)."""
    variant = variant_of(json.loads((folder / "config.json").read_text()))
    if variant is not None:
        return variant.load_folder(folder, dtype)
    return UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype)


def _reconcile_v2(requested: bool | None, detected: bool, path: Path) -> bool:
    if requested is not None and requested != detected:
        logger.warning(
            "'%s' holds an SD%s text encoder; %s --v2 is ignored",
            path,
            "2" if detected else "1",
            "the given" if requested else "the missing",
        )
    return detected


def _read_yaml_beside(path: Path) -> dict | None:
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    try:
        return yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError as err:
        raise CheckpointError(f"cannot parse config '{yaml_path}': {str(err).splitlines()[0]}") from err


def _load_single_file(
    path, v2, v_parameterization, tokenizer_cache_dir, dtype, keep_extra, reading: dict
) -> StableDiffusionModel:
    # each tensor is cast as it is read (kept tensors stay as stored, for a bit-exact round trip)
    vae_dtype = reading.pop("vae_dtype", None) or dtype
    keep_narrow = reading.pop("keep_narrow", False)
    dtype_for = None if keep_extra or dtype is None else dtype_by_part(dtype, vae_dtype, keep_narrow)
    state_dict = read_state_dict(path, dtype=dtype_for, **reading)
    state_dict = ldm_arch.normalize_clip_keys(state_dict)
    if not ldm_arch.is_sd_checkpoint(state_dict):
        raise CheckpointError(_not_sd_message(path, state_dict))
    if sgm.checkpoint_family(state_dict) == "sdxl":
        raise CheckpointError(f"'{path}' is an SDXL checkpoint: train it with sdxl_train_network.py")
    arch = ldm_arch.infer_architecture(state_dict, bool(v_parameterization), _read_yaml_beside(path))
    v2 = _reconcile_v2(v2, arch.v2, path)
    v_parameterization = arch.original_config["model"]["params"]["parameterization"] == "v"
    if v2 and not v_parameterization:
        logger.info("'%s' is loaded as an epsilon-prediction SD2 model; pass --v_parameterization for 768-v", path)

    unet_config = ldm_arch.unet_config_from_ldm(arch, state_dict)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae_config = ldm_arch.vae_config_from_ldm(arch, state_dict)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_config))
    _assign(unet, conv.convert_unet_from_ldm(state_dict, unet_config), path, "UNet")
    _assign(vae, conv.convert_vae_from_ldm(state_dict, vae_config), path, "VAE")
    te_state = conv.convert_text_encoder_from_ldm(state_dict, text_encoder, arch.v2)
    te_keys = set(text_encoder.state_dict())
    _assign(text_encoder, {k: v for k, v in te_state.items() if k in te_keys}, path, "text encoder")
    if dtype is not None:
        settle_dtypes(((unet, dtype), (vae, vae_dtype), (text_encoder, dtype)), keep_narrow)

    extra = {}
    if keep_extra:
        produced = set(conv.unet_to_ldm(unet.state_dict(), unet.config))
        produced |= set(conv.vae_to_ldm(vae.state_dict(), vae.config))
        produced |= set(family_of(v2).text_encoder_to_ldm(text_encoder.state_dict()))
        extra = {k: v for k, v in state_dict.items() if k not in produced}
    tokenizer = load_tokenizer(v2, tokenizer_cache_dir, path)
    return StableDiffusionModel(
        text_encoder,
        vae,
        unet,
        tokenizer,
        make_training_scheduler(v_parameterization),
        v2,
        v_parameterization,
        str(path),
        extra,
    )


def dtype_by_part(dtype: torch.dtype, vae_dtype: torch.dtype, keep_narrow: bool = False):
    """A per-key dtype for a single file: the VAE's (``--no_half_vae``) or everyone else's.

    ``keep_narrow``: float32 parts are read as stored (:func:`settle_dtypes` widens all but the
    matmul weights).
    """

    def as_read(target: torch.dtype) -> torch.dtype | None:
        return None if keep_narrow and target == torch.float32 else target

    return lambda key: as_read(vae_dtype) if key.startswith(ldm_arch.VAE_PREFIX) else as_read(dtype)


def settle_dtypes(parts, keep_narrow: bool) -> None:
    """Each ``(module, dtype)`` in its dtype; with ``keep_narrow``, float32 parts keep narrow matmul weights."""
    for module, dtype in parts:
        if keep_narrow and dtype == torch.float32:
            keep_weights_narrow(module.requires_grad_(False), dtype)  # loaded models are frozen
        elif dtype is not None:
            nn.Module.to(module, dtype)  # torch's: diffusers' override logs a warning per cast


def _assign(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path, part: str) -> None:
    result = module.load_state_dict(state_dict, strict=False, assign=True)
    missing = result.missing_keys
    if missing:
        raise CheckpointError(
            f"checkpoint '{path}' lacks {len(missing)} {part} tensors (first: {missing[0]}); "
            "is it a complete SD1.x/SD2.x model?"
        )
    if result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint '{path}' has {part} tensors this architecture does not use "
            f"(first: {result.unexpected_keys[0]})"
        )


def _not_sd_message(path: Path, state_dict: dict[str, torch.Tensor]) -> str:
    keys = list(state_dict)
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        hint = "it is a LoRA file: pass it with --network_weights"
    elif any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        hint = "it looks like a bare diffusers UNet state dict: pass the whole diffusers folder instead"
    elif any(k.startswith(("encoder.", "decoder.")) for k in keys):
        hint = "it looks like a VAE: pass it with --vae"
    else:
        hint = f"first key is '{keys[0]}'" if keys else "it holds no tensors"
    return f"'{path}' is not a Stable Diffusion checkpoint (no model.diffusion_model.* keys): {hint}"


def load_vae(path: str | os.PathLike, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """kohya's ``--vae``: a diffusers VAE folder (or model folder), or a single file holding an LDM
    VAE (``encoder.*``, as released VAEs ship) or a whole LDM model (``first_stage_model.*``)."""
    path = Path(path)
    if path.is_dir():
        subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
        try:
            return AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"--vae '{path}' is not a diffusers VAE folder: {str(err).splitlines()[0]}") from err
    state_dict = read_state_dict(path)
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state_dict):
        raise CheckpointError(
            f"--vae '{path}' is a bare diffusers VAE state dict: pass the folder with its config.json"
        )
    if not any(k.startswith(ldm_arch.VAE_PREFIX) for k in state_dict):
        state_dict = {ldm_arch.VAE_PREFIX + k: v for k, v in state_dict.items()}
    if f"{ldm_arch.VAE_PREFIX}encoder.conv_in.weight" not in state_dict:
        raise CheckpointError(f"--vae '{path}' holds no VAE weights (no encoder.conv_in.weight)")
    vae_config = ldm_arch.vae_config_from_ldm(ldm_arch.vae_only_architecture(state_dict), state_dict)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(vae_config)
    _assign(vae, conv.convert_vae_from_ldm(state_dict, vae_config), path, "VAE")
    return vae.to(dtype) if dtype is not None else vae


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def _load_tokenizer_folder(folder: Path, model_path: Path) -> CLIPTokenizer:
    if not (folder / "vocab.json").is_file():
        raise TokenizerNotFoundError(f"diffusers folder '{model_path}' has no tokenizer/vocab.json")
    return CLIPTokenizer.from_pretrained(folder)


def load_tokenizer(v2: bool, tokenizer_cache_dir: str | os.PathLike | None, model_path: Path) -> CLIPTokenizer:
    """The CLIP tokenizer for a single-file checkpoint, found offline.

    Looks in ``--tokenizer_cache_dir`` (kohya's layout ``DIR/openai_clip-vit-large-patch14`` or
    ``DIR/stabilityai_stable-diffusion-2``, or ``DIR`` itself), then in the local Hugging Face
    cache; it never downloads.
    """
    family = family_of(v2)
    hub_id, folder_name = family.tokenizer_hub_id, family.tokenizer_folder
    if tokenizer_cache_dir is not None:
        base = Path(tokenizer_cache_dir)
        for folder in (base / folder_name, base / folder_name / "tokenizer", base):
            if (folder / "vocab.json").is_file():
                return CLIPTokenizer.from_pretrained(folder)
    try:
        subfolder = "tokenizer" if v2 else ""
        return CLIPTokenizer.from_pretrained(hub_id, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError, TypeError):  # transformers reports a cache miss in several ways
        pass
    where = (
        f"'{tokenizer_cache_dir}' has no {folder_name}/vocab.json"
        if tokenizer_cache_dir
        else ("no --tokenizer_cache_dir given")
    )
    raise TokenizerNotFoundError(
        f"no CLIP tokenizer for single-file checkpoint '{model_path}' ({where}): pass --tokenizer_cache_dir DIR "
        f"with DIR/{folder_name}/ holding vocab.json and merges.txt, or use a diffusers folder"
    )


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def ldm_state_dict(model: StableDiffusionModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model in single-file LDM key layout (plus any extra tensors kept at load time)."""
    variant = variant_of(model.unet.config)
    if variant is not None:
        raise CheckpointError(variant.single_file_refusal)
    state = conv.unet_to_ldm(model.unet.state_dict(), model.unet.config)
    state.update(conv.vae_to_ldm(model.vae.state_dict(), model.vae.config))
    te_state = model.text_encoder.state_dict()
    text = model.family.text_encoder_to_ldm(te_state)
    state.update(text)
    if model.extra_ldm_state:
        state.update(model.extra_ldm_state)
    elif model.v2:
        state.update(conv.sd2_dummy_final_layer(text))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def save_ldm_checkpoint(
    model: StableDiffusionModel, path: str | os.PathLike, dtype: torch.dtype | None = None
) -> None:
    """Write a single-file checkpoint (``.safetensors`` or ``.ckpt``) that A1111/ComfyUI load."""
    write_single_file(ldm_state_dict(model, dtype), path)


def write_single_file(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """A single-file checkpoint by its extension: ``.safetensors``, else a ``.ckpt`` with a ``state_dict``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        save_state_dict(state, path)
    else:
        with_wrapper = {"state_dict": {k: v.contiguous() for k, v in state.items()}}
        with atomic_path(path) as tmp:
            torch.save(with_wrapper, tmp)


def save_diffusers_folder(
    model: StableDiffusionModel, out_dir: str | os.PathLike, dtype: torch.dtype | None = None
) -> None:
    """Write a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads."""
    scheduler = PNDMScheduler.from_config(
        model.noise_scheduler.config, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False
    )
    pipeline = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    write_pipeline_folder(pipeline, out_dir, dtype)


def write_pipeline_folder(pipeline, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """``pipeline.save_pretrained`` in ``dtype``, into a folder that appears only when complete."""
    if dtype is not None:
        pipeline.to(dtype=dtype)
    with atomic_directory(out_dir) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
