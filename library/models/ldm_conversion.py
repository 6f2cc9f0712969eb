"""Key conversion between single-file LDM checkpoints and diffusers/transformers models.

LDM -> diffusers uses diffusers' own single-file converters (``diffusers.loaders.single_file_utils``);
we only supply the LDM "original config" they need (``ldm_architecture`` builds it from the tensors).

diffusers -> LDM is written here by hand because diffusers ships that direction only as an
unpackaged script. Each rule below is the inverse of one rule in diffusers' forward converter, and
the tests check ``to_ldm(from_ldm(sd)) == sd`` bit for bit on SD1- and SD2-shaped checkpoints.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

from library.errors import CheckpointError
from library.models.ldm_architecture import CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, count_indices


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
    last = count_indices(ldm_text, re.escape(OPEN_CLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.") - 1
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
