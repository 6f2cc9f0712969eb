"""Key conversion between single-file LDM checkpoints and diffusers/transformers models.

LDM -> diffusers uses diffusers' own single-file converters (``diffusers.loaders.single_file_utils``);
we only supply the LDM "original config" they need, built in code from the checkpoint's tensor
shapes (or from a ``<checkpoint>.yaml`` beside it, the A1111 convention), so nothing is fetched.

diffusers -> LDM is written here by hand because diffusers ships that direction only as an
unpackaged script. Each rule below is the inverse of one rule in diffusers' forward converter, and
the tests check ``to_ldm(from_ldm(sd)) == sd`` bit for bit on SD1- and SD2-shaped checkpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
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


def _count_indices(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := regex.match(k))}
    return max(found) + 1 if found else 0


def _infer_unet_params(sd: dict[str, torch.Tensor], v2: bool) -> dict[str, Any]:
    keys = [k[len(UNET_PREFIX) :] for k in sd if k.startswith(UNET_PREFIX)]
    model_channels, in_channels = sd[f"{UNET_PREFIX}input_blocks.0.0.weight"].shape[:2]
    num_input_blocks = _count_indices(keys, r"input_blocks\.(\d+)\.")
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
        "transformer_depth": _count_indices(keys, re.escape(attn_block) + r"transformer_blocks\.(\d+)\."),
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
    levels = _count_indices(keys, r"down\.(\d+)\.")
    num_res_blocks = _count_indices([k for k in keys if k.startswith("down.0.")], r"down\.0\.block\.(\d+)\.")
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
        layers = _count_indices(sd, re.escape(p) + r"transformer\.resblocks\.(\d+)\.") - 1
        intermediate = sd[f"{p}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        max_positions = sd[f"{p}positional_embedding"].shape[0]
        act = "gelu"
    else:
        p = f"{CLIP_PREFIX}text_model."
        if f"{p}embeddings.token_embedding.weight" not in sd:
            raise CheckpointError("no text encoder weights (cond_stage_model.*) in the checkpoint")
        vocab, hidden = sd[f"{p}embeddings.token_embedding.weight"].shape
        layers = _count_indices(sd, re.escape(p) + r"encoder\.layers\.(\d+)\.")
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


def convert_unet_from_ldm(state_dict, unet_config) -> dict[str, torch.Tensor]:
    return convert_ldm_unet_checkpoint(state_dict, unet_config)


def convert_vae_from_ldm(state_dict, vae_config) -> dict[str, torch.Tensor]:
    return convert_ldm_vae_checkpoint(state_dict, vae_config)


def convert_text_encoder_from_ldm(state_dict, text_model, v2: bool) -> dict[str, torch.Tensor]:
    if v2:
        return convert_open_clip_checkpoint(text_model, state_dict, prefix=OPEN_CLIP_PREFIX)
    return convert_ldm_clip_checkpoint(state_dict)


# ---------------------------------------------------------------------------------------------
# diffusers -> LDM (inverse of diffusers' forward rules)
# ---------------------------------------------------------------------------------------------

_UNET_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _rename_head(suffix: str, table: list[tuple[str, str]]) -> str:
    for new, old in table:
        if suffix.startswith(new + "."):
            return old + suffix[len(new) :]
    return suffix


def unet_to_ldm(unet_sd: dict[str, torch.Tensor], unet_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys."""
    lpb = unet_config["layers_per_block"]
    if not isinstance(lpb, int):
        raise CheckpointError("single-file export needs the same layers_per_block in every UNet stage")
    up_types = unet_config["up_block_types"]
    layers = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    out = {}
    for key, value in unet_sd.items():
        if key in layers:
            out[UNET_PREFIX + layers[key]] = value
            continue
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + b * (lpb + 1) + j
            new = (
                f"input_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}"
                if kind == "resnets"
                else (f"input_blocks.{index}.1.{rest}")
            )
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_rename_head(m[2], _UNET_RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = b * (lpb + 1) + j
            new = (
                f"output_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}"
                if kind == "resnets"
                else (f"output_blocks.{index}.1.{rest}")
            )
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            slot = 2 if up_types[b].startswith("CrossAttn") else 1
            new = f"output_blocks.{b * (lpb + 1) + lpb}.{slot}.conv.{m[2]}"
        else:
            raise CheckpointError(f"cannot map UNet key '{key}' to the LDM layout")
        out[UNET_PREFIX + new] = value
    return out


def vae_to_ldm(vae_sd: dict[str, torch.Tensor], vae_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> ``first_stage_model.*`` keys."""
    num_up = len(vae_config["up_block_types"])
    table = DIFFUSERS_TO_LDM_MAPPING["vae"]
    out = {}
    for key, value in vae_sd.items():
        if key in table:
            out[VAE_PREFIX + table[key]] = value
            continue
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_head(m[3], [('conv_shortcut', 'nin_shortcut')])}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            rest = _rename_head(m[2], _VAE_ATTENTION)
            new = f"{m[1]}.mid.attn_1.{rest}"
            if rest.split(".")[0] in ("q", "k", "v", "proj_out") and rest.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None]  # LDM keeps these as 1x1 convolutions
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_rename_head(m[3], [('conv_shortcut', 'nin_shortcut')])}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level = num_up - 1 - int(m[1])
            new = f"decoder.up.{level}.block.{m[2]}.{_rename_head(m[3], [('conv_shortcut', 'nin_shortcut')])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        else:
            raise CheckpointError(f"cannot map VAE key '{key}' to the LDM layout")
        out[VAE_PREFIX + new] = value
    return out


def clip_to_ldm(te_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel state dict (SD1) -> ``cond_stage_model.transformer.*`` keys."""
    return {CLIP_PREFIX + canonical_clip_key(k): v for k, v in te_sd.items()}


_OPEN_CLIP_LAYER = [
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
]


def open_clip_to_ldm(te_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel state dict (SD2) -> OpenCLIP ``cond_stage_model.model.*`` keys."""
    table = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out, qkv = {}, {}
    for key, value in te_sd.items():
        key = canonical_clip_key(key)
        if key in table:
            out[OPEN_CLIP_PREFIX + table[key]] = value
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{m[1]}.{_rename_head(m[2], _OPEN_CLIP_LAYER)}"] = value
        elif key == "text_model.embeddings.position_ids":
            continue
        else:
            raise CheckpointError(f"cannot map text encoder key '{key}' to the OpenCLIP layout")
    for (layer, kind), parts in qkv.items():
        out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return out


def sd2_dummy_final_layer(ldm_text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP tensors SD2 consumers expect but that the HF text encoder drops.

    SD2 conditions on the penultimate OpenCLIP layer, so the last resblock and the projection never
    affect images; like kohya, a model saved without its original ones gets a copy of the last kept
    layer and an identity projection so that A1111/ComfyUI load the file.
    """
    last = _count_indices(ldm_text, re.escape(OPEN_CLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.") - 1
    src = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{last}."
    dst = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{last + 1}."
    extra = {k.replace(src, dst): v.clone() for k, v in ldm_text.items() if k.startswith(src)}
    width = ldm_text[f"{OPEN_CLIP_PREFIX}token_embedding.weight"].shape[1]
    dtype = ldm_text[f"{OPEN_CLIP_PREFIX}token_embedding.weight"].dtype
    extra[f"{OPEN_CLIP_PREFIX}text_projection"] = torch.eye(width, dtype=dtype)
    extra[f"{OPEN_CLIP_PREFIX}logit_scale"] = torch.tensor(1.0, dtype=dtype)
    return extra


def canonical_clip_key(key: str) -> str:
    """transformers >= 5.6 flattened CLIPTextModel; keep the SD ecosystem's ``text_model.`` names."""
    if key.startswith(("text_model.", "text_projection")):
        return key
    return "text_model." + key
