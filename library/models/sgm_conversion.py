"""Key conversion between SDXL single files (Stability's SGM layout) and diffusers/transformers models.

An SGM file holds ``model.diffusion_model.*`` (the UNet, LDM names plus ``label_emb``, the size and
pooled-text embedding), ``conditioner.embedders.0.transformer.*`` (CLIP-L, transformers names),
``conditioner.embedders.1.model.*`` (OpenCLIP bigG: fused ``in_proj`` attention, a ``text_projection``
matrix stored transposed) and ``first_stage_model.*`` (the VAE).

SGM -> diffusers uses diffusers' own single-file converters; the LDM config they need is built here
from tensor shapes. diffusers -> SGM reuses the hand-written LDM inverse of ``ldm_conversion`` (diffusers
ships no packaged converter in that direction) and re-prefixes the text encoders; the tests check
``to_sgm(from_sgm(sd)) == sd`` bit for bit.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
)

from library.errors import CheckpointError
from library.models import ldm_architecture as ldm_arch
from library.models import ldm_conversion as conv

TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
LABEL_EMBEDDING = f"{ldm_arch.UNET_PREFIX}label_emb.0.0.weight"
SDXL_VAE_SCALE_FACTOR = 0.13025
SDXL_SAMPLE_SIZE = 128  # latent size of SDXL's 1024 px training resolution
_ADDITION_TABLE = DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]


def checkpoint_family(state_dict: dict[str, torch.Tensor]) -> str | None:
    """``"sdxl"``, ``"sd2"`` or ``"sd1"`` for a single file's tensors; None when it holds no SD UNet."""
    if not ldm_arch.is_sd_checkpoint(state_dict):
        return None
    if LABEL_EMBEDDING in state_dict or any(k.startswith("conditioner.embedders.") for k in state_dict):
        return "sdxl"
    return "sd2" if ldm_arch.is_v2_checkpoint(state_dict) else "sd1"


def _with_prefix(state_dict: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {new + k[len(old) :]: v for k, v in state_dict.items() if k.startswith(old)}


def _transformer_depths(state_dict: dict[str, torch.Tensor], levels: int, num_res_blocks: int) -> list[int]:
    """Transformer blocks per UNet level (0 where the level has no attention), counted in the input blocks."""
    depths = []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        pattern = re.escape(f"{ldm_arch.UNET_PREFIX}input_blocks.{first}.1.") + r"transformer_blocks\.(\d+)\."
        depths.append(ldm_arch.count_indices(state_dict, pattern))
    return depths


def text_configs(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers configs of CLIP-L (``CLIPTextModel``) and bigG (``CLIPTextModelWithProjection``)."""
    te1 = ldm_arch._infer_text_config(_with_prefix(state_dict, TE1_PREFIX, ldm_arch.CLIP_PREFIX), v2=False)
    te2_keys = _with_prefix(state_dict, TE2_PREFIX, ldm_arch.OPEN_CLIP_PREFIX)
    if f"{ldm_arch.OPEN_CLIP_PREFIX}token_embedding.weight" not in te2_keys:
        raise CheckpointError("no second text encoder weights (conditioner.embedders.1.model.*) in the checkpoint")
    te2 = ldm_arch._infer_text_config(te2_keys, v2=True)
    te2["num_hidden_layers"] += 1  # SDXL keeps every OpenCLIP layer (SD2 drops the last one)
    te2["projection_dim"] = int(state_dict[f"{TE2_PREFIX}text_projection"].shape[1])
    return te1, te2


def infer_sdxl_architecture(state_dict: dict[str, torch.Tensor]) -> tuple[ldm_arch.LdmArchitecture, dict[str, Any]]:
    """The SGM config diffusers' converters expect (CLIP-L's config inside), and bigG's config."""
    unet_params = ldm_arch._infer_unet_params(state_dict, v2=True)  # SDXL, like SD2: 64 channels per head
    levels, num_res_blocks = len(unet_params["channel_mult"]), unet_params["num_res_blocks"]
    unet_params["transformer_depth"] = _transformer_depths(state_dict, levels, num_res_blocks)
    unet_params["num_classes"] = "sequential"
    unet_params["adm_in_channels"] = int(state_dict[LABEL_EMBEDDING].shape[1])
    te1, te2 = text_configs(state_dict)
    original_config = {
        "model": {
            "params": {
                "scale_factor": SDXL_VAE_SCALE_FACTOR,
                "network_config": {"params": unet_params},
                "first_stage_config": {"params": {"ddconfig": ldm_arch._infer_vae_params(state_dict)}},
            }
        }
    }
    return ldm_arch.LdmArchitecture(
        v2=False,
        original_config=original_config,
        text_config=te1,
        sample_size=SDXL_SAMPLE_SIZE,
        notes=[],
    ), te2


def unet_config_from_sgm(arch: ldm_arch.LdmArchitecture, state_dict: dict[str, torch.Tensor], pooled_dim: int) -> dict:
    """diffusers' UNet config for an SDXL UNet; the size/pooled embedding is set from the shapes.

    diffusers recognises SDXL only by its released context widths (2048, 1280); the embedding type
    is set here so that any SDXL-shaped UNet (fine-tunes, tiny test models) converts.
    """
    config = create_unet_diffusers_config_from_ldm(arch.original_config, state_dict)
    adm_in = arch.original_config["model"]["params"]["network_config"]["params"]["adm_in_channels"]
    if (adm_in - pooled_dim) % 6:
        raise CheckpointError(f"label_emb takes {adm_in} features: not pooled text ({pooled_dim}) + 6 size embeddings")
    depths = config["transformer_layers_per_block"]
    config.update(
        class_embed_type=None,
        addition_embed_type="text_time",
        addition_time_embed_dim=(adm_in - pooled_dim) // 6,
        projection_class_embeddings_input_dim=adm_in,
        transformer_layers_per_block=[max(depth, 1) for depth in depths],  # diffusers' SDXL configs say 1, not 0
        sample_size=arch.sample_size,
    )
    config.update(_layer_level_structure(state_dict, config))
    return config


def _layer_level_structure(state_dict: dict[str, torch.Tensor], config: dict) -> dict:
    """Config keys for UNets whose depth varies inside a level or whose mid block is one resnet.

    Segmind's SSD-1B and Vega (and students of ``distill_unet.py``) keep different numbers of
    transformer layers per attention block and drop the mid block's attention; diffusers describes
    them with per-layer ``transformer_layers_per_block``, ``reverse_transformer_layers_per_block``
    and ``mid_block_type: UNetMidBlock2D``. SDXL's own files need none of it (returns ``{}``).
    """
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]

    def depth(block: str, index: int) -> int:
        pattern = re.escape(f"{ldm_arch.UNET_PREFIX}{block}.{index}.1.") + r"transformer_blocks\.(\d+)\."
        return ldm_arch.count_indices(state_dict, pattern)

    down = [[depth("input_blocks", 1 + level * (layers + 1) + j) for j in range(layers)] for level in range(levels)]
    up = [[depth("output_blocks", block * (layers + 1) + j) for j in range(layers + 1)] for block in range(levels)]
    update = {}
    if f"{ldm_arch.UNET_PREFIX}middle_block.2.in_layers.0.weight" not in state_dict:
        update["mid_block_type"] = "UNetMidBlock2D"  # one resnet, no attention
    uniform = all(len(set(d)) == 1 for d in down) and all(
        set(u) <= {d[0]} for u, d in zip(up, down[::-1], strict=True)
    )
    if not uniform:
        update["transformer_layers_per_block"] = [[max(n, 1) for n in d] for d in down]
        update["reverse_transformer_layers_per_block"] = [[max(n, 1) for n in u] for u in up]
    return update


def convert_unet_from_sgm(state_dict, unet_config) -> dict[str, torch.Tensor]:
    return convert_ldm_unet_checkpoint(state_dict, unet_config)


def convert_text_encoders_from_sgm(state_dict, text_encoder_2) -> tuple[dict, dict]:
    """(CLIP-L, bigG) state dicts in transformers names; bigG's fused attention is split by diffusers."""
    te1 = convert_ldm_clip_checkpoint(_with_prefix(state_dict, TE1_PREFIX, TE1_PREFIX), remove_prefix=TE1_PREFIX)
    te2 = convert_open_clip_checkpoint(text_encoder_2, state_dict, prefix=TE2_PREFIX)
    return te1, te2


# ---------------------------------------------------------------------------------------------
# diffusers -> SGM (hand-written: diffusers ships this direction only as an unpackaged script)
# ---------------------------------------------------------------------------------------------


def unet_to_sgm(unet_sd: dict[str, torch.Tensor], unet_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers SDXL UNet state dict -> ``model.diffusion_model.*`` (``add_embedding`` -> ``label_emb``)."""
    addition = {k: v for k, v in unet_sd.items() if k.startswith("add_embedding.")}
    out = conv.unet_to_ldm({k: v for k, v in unet_sd.items() if k not in addition}, unet_config)
    for key, value in addition.items():
        if key not in _ADDITION_TABLE:
            raise CheckpointError(f"cannot map UNet key '{key}' to the SGM layout")
        out[ldm_arch.UNET_PREFIX + _ADDITION_TABLE[key]] = value
    return out


def text_encoder_1_to_sgm(te_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP-L keeps transformers names under ``conditioner.embedders.0.transformer.``."""
    return _with_prefix(conv.clip_to_ldm(te_sd), ldm_arch.CLIP_PREFIX, TE1_PREFIX)


def text_encoder_2_to_sgm(te_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """bigG in OpenCLIP names: q/k/v fused into ``in_proj``, the projection stored as ``x @ P`` (transposed)."""
    projection = te_sd.get("text_projection.weight")
    if projection is None:
        raise CheckpointError("the second text encoder has no text_projection (is it a CLIPTextModelWithProjection?)")
    rest = {k: v for k, v in te_sd.items() if k != "text_projection.weight"}
    out = _with_prefix(conv.open_clip_to_ldm(rest), ldm_arch.OPEN_CLIP_PREFIX, TE2_PREFIX)
    out[f"{TE2_PREFIX}text_projection"] = projection.T.contiguous()
    return out
