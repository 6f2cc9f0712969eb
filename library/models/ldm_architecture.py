"""What a single-file LDM checkpoint is: SD version, UNet/VAE/text-encoder configs, from its tensors.

The LDM key prefixes, the SD releases' conventions for what the weights cannot tell, and the
"original config" diffusers' single-file converters need, built in code from the checkpoint's tensor
shapes (or from a ``<checkpoint>.yaml`` beside it, the A1111 convention), so nothing is fetched.
``ldm_conversion`` converts the keys with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.loaders.single_file_utils import (
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

from library.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

# Conventions of the SD releases for what the weights cannot tell: SD1 UNets use 8 attention heads,
# SD2 UNets 64 channels per head; both CLIP text encoders use 64 channels per head.
SD1_UNET_NUM_HEADS = 8
SD2_UNET_HEAD_CHANNELS = 64
CLIP_HEAD_CHANNELS = 64
VAE_SCALE_FACTOR = 0.18215


@dataclass
class LdmArchitecture:
    """What a single-file checkpoint is, in the vocabulary of the LDM yaml configs."""

    v2: bool
    original_config: dict[str, Any]
    text_config: dict[str, Any]
    sample_size: int
    upcast_attention: bool = False
    notes: list[str] = field(default_factory=list)


def is_sd_checkpoint(state_dict: dict[str, torch.Tensor]) -> bool:
    return f"{UNET_PREFIX}input_blocks.0.0.weight" in state_dict


def is_v2_checkpoint(state_dict: dict[str, torch.Tensor]) -> bool:
    """SD2 checkpoints carry an OpenCLIP text encoder, SD1 a transformers CLIP one."""
    return any(k.startswith(OPEN_CLIP_PREFIX) for k in state_dict)


def normalize_clip_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older SD1 checkpoints lack the ``text_model.`` level inside the CLIP prefix; add it."""
    legacy = (f"{CLIP_PREFIX}embeddings.", f"{CLIP_PREFIX}encoder.", f"{CLIP_PREFIX}final_layer_norm.")
    if not any(k.startswith(legacy) for k in state_dict):
        return state_dict
    return {
        (k.replace(CLIP_PREFIX, f"{CLIP_PREFIX}text_model.", 1) if k.startswith(legacy) else k): v
        for k, v in state_dict.items()
    }


def count_indices(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := regex.match(k))}
    return max(found) + 1 if found else 0


def _infer_unet_params(sd: dict[str, torch.Tensor], v2: bool) -> dict[str, Any]:
    keys = [k[len(UNET_PREFIX) :] for k in sd if k.startswith(UNET_PREFIX)]
    model_channels, in_channels = sd[f"{UNET_PREFIX}input_blocks.0.0.weight"].shape[:2]
    num_input_blocks = count_indices(keys, r"input_blocks\.(\d+)\.")
    downsample_blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))})
    levels = len(downsample_blocks) + 1
    num_res_blocks = (num_input_blocks - 1 - len(downsample_blocks)) // levels
    channel_mult, attention_resolutions = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        out_ch = sd[f"{UNET_PREFIX}input_blocks.{first}.0.out_layers.3.weight"].shape[0]
        channel_mult.append(out_ch // model_channels)
        if any(k.startswith(f"input_blocks.{first}.1.") for k in keys):
            attention_resolutions.append(2**level)
    attn_keys = [k for k in keys if k.endswith("attn2.to_k.weight")]
    if not attn_keys:
        raise CheckpointError("UNet has no cross-attention layers; this is not an SD1.x/SD2.x model")
    proj_in = next(k for k in keys if k.endswith("proj_in.weight"))
    attn_block = proj_in[: -len("proj_in.weight")]
    params: dict[str, Any] = {
        "in_channels": int(in_channels),
        "out_channels": int(sd[f"{UNET_PREFIX}out.2.weight"].shape[0]),
        "model_channels": int(model_channels),
        "channel_mult": channel_mult,
        "num_res_blocks": num_res_blocks,
        "attention_resolutions": attention_resolutions,
        "transformer_depth": count_indices(keys, re.escape(attn_block) + r"transformer_blocks\.(\d+)\."),
        "context_dim": int(sd[f"{UNET_PREFIX}{attn_keys[0]}"].shape[1]),
        "use_linear_in_transformer": sd[f"{UNET_PREFIX}{proj_in}"].ndim == 2,
    }
    if v2:
        params["num_head_channels"] = SD2_UNET_HEAD_CHANNELS
    else:
        params["num_heads"] = SD1_UNET_NUM_HEADS
    return params


def _infer_vae_params(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    p = f"{VAE_PREFIX}encoder."
    if f"{p}conv_in.weight" not in sd:
        raise CheckpointError("no VAE weights (first_stage_model.*) in the checkpoint")
    ch, in_channels = sd[f"{p}conv_in.weight"].shape[:2]
    keys = [k[len(p) :] for k in sd if k.startswith(p)]
    levels = count_indices(keys, r"down\.(\d+)\.")
    num_res_blocks = count_indices([k for k in keys if k.startswith("down.0.")], r"down\.0\.block\.(\d+)\.")
    ch_mult = [sd[f"{p}down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)]
    return {
        "double_z": True,
        "z_channels": int(sd[f"{p}conv_out.weight"].shape[0] // 2),
        "resolution": 256,
        "in_channels": int(in_channels),
        "out_ch": int(sd[f"{VAE_PREFIX}decoder.conv_out.weight"].shape[0]),
        "ch": int(ch),
        "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def _infer_text_config(sd: dict[str, torch.Tensor], v2: bool) -> dict[str, Any]:
    if v2:
        p = OPEN_CLIP_PREFIX
        vocab, hidden = sd[f"{p}token_embedding.weight"].shape
        # SD2 uses the penultimate OpenCLIP layer: the diffusers/HF text encoder has one layer fewer.
        layers = count_indices(sd, re.escape(p) + r"transformer\.resblocks\.(\d+)\.") - 1
        intermediate = sd[f"{p}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        max_positions = sd[f"{p}positional_embedding"].shape[0]
        act = "gelu"
    else:
        p = f"{CLIP_PREFIX}text_model."
        if f"{p}embeddings.token_embedding.weight" not in sd:
            raise CheckpointError("no text encoder weights (cond_stage_model.*) in the checkpoint")
        vocab, hidden = sd[f"{p}embeddings.token_embedding.weight"].shape
        layers = count_indices(sd, re.escape(p) + r"encoder\.layers\.(\d+)\.")
        intermediate = sd[f"{p}encoder.layers.0.mlp.fc1.weight"].shape[0]
        max_positions = sd[f"{p}embeddings.position_embedding.weight"].shape[0]
        act = "quick_gelu"
    return {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(intermediate),
        "num_hidden_layers": int(layers),
        "num_attention_heads": max(1, int(hidden) // CLIP_HEAD_CHANNELS),
        "max_position_embeddings": int(max_positions),
        "hidden_act": act,
        "projection_dim": int(hidden),
    }


def infer_architecture(
    state_dict: dict[str, torch.Tensor], v_parameterization: bool, yaml_config: dict[str, Any] | None = None
) -> LdmArchitecture:
    """Build the LDM config diffusers' converters expect, from the tensors (or a yaml beside the file)."""
    v2 = is_v2_checkpoint(state_dict)
    notes = []
    if yaml_config is not None:
        try:
            unet_params = dict(yaml_config["model"]["params"]["unet_config"]["params"])
            vae_params = dict(yaml_config["model"]["params"]["first_stage_config"]["params"]["ddconfig"])
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"the yaml config beside the checkpoint lacks {err}") from err
        if yaml_config["model"]["params"].get("parameterization") == "v":
            v_parameterization = True
        notes.append("architecture read from the yaml config beside the checkpoint")
    else:
        unet_params = _infer_unet_params(state_dict, v2)
        vae_params = _infer_vae_params(state_dict)
    latent = 96 if (v2 and v_parameterization) else 64
    sample_size = int(unet_params.get("image_size", latent))
    original_config = {
        "model": {
            "params": {
                "parameterization": "v" if v_parameterization else "eps",
                "scale_factor": VAE_SCALE_FACTOR,
                "unet_config": {"params": unet_params},
                "first_stage_config": {"params": {"ddconfig": vae_params}},
            }
        }
    }
    return LdmArchitecture(
        v2=v2,
        original_config=original_config,
        text_config=_infer_text_config(state_dict, v2),
        sample_size=sample_size,
        upcast_attention=v2 and v_parameterization,
        notes=notes,
    )


def vae_only_architecture(state_dict: dict[str, torch.Tensor]) -> LdmArchitecture:
    """The architecture of a file that holds only a VAE (``--vae``)."""
    config = {
        "model": {
            "params": {
                "scale_factor": VAE_SCALE_FACTOR,
                "first_stage_config": {"params": {"ddconfig": _infer_vae_params(state_dict)}},
            }
        }
    }
    return LdmArchitecture(v2=False, original_config=config, text_config={}, sample_size=64)


def unet_config_from_ldm(arch: LdmArchitecture, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    config = create_unet_diffusers_config_from_ldm(arch.original_config, state_dict)
    if not any(k.startswith(f"{UNET_PREFIX}middle_block.") for k in state_dict):
        config["mid_block_type"] = None  # BK-SDM small/tiny students have no mid block
    config["sample_size"] = arch.sample_size
    config["upcast_attention"] = arch.upcast_attention
    return config


def vae_config_from_ldm(arch: LdmArchitecture, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    config = create_vae_diffusers_config_from_ldm(arch.original_config, state_dict)
    config["sample_size"] = arch.sample_size * 8
    return config
