"""kohya's SDXL module names for a diffusers SDXL UNet: the SGM (Stability ``generative-models``) paths.

kohya trains SDXL on its own UNet (``library/sdxl_original_unet.py``), whose module tree follows the
SGM checkpoint layout: ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` instead of diffusers'
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``, resnets as ``in_layers.2`` /
``emb_layers.1`` / ``out_layers.3`` / ``skip_connection``, downsamplers as ``op``. Its SDXL LoRA keys
(``lora_unet_input_blocks_4_1_…``) are those paths, so a network built on a diffusers UNet renames
each module path here. Written by hand: ``networks/`` imports only torch (kohya users copy these files).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from networks.errors import NetworkError

_RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    renamed = _RESNET_LAYERS.get(head, head)
    return f"{renamed}.{tail}" if tail else renamed


def sgm_module_path(path: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """The SGM path of a diffusers UNet module path (``up_blocks_with_attention``: indices of CrossAttn up blocks)."""
    if path in _TOP_LEVEL:
        return _TOP_LEVEL[path]
    step = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        index = 1 + int(m[1]) * step + int(m[3])
        return f"input_blocks.{index}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"input_blocks.{index}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", path):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        index = int(m[1]) * step + int(m[3])
        return f"output_blocks.{index}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"output_blocks.{index}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        block = int(m[1])
        slot = 2 if block in up_blocks_with_attention else 1
        return f"output_blocks.{block * step + layers_per_block}.{slot}.conv"
    raise NetworkError(f"no SGM name for UNet module '{path}'")


def unet_path_renamer(unet) -> Callable[[str], str] | None:
    """For a diffusers SDXL UNet (``addition_embed_type`` ``text_time``), the module path -> SGM path map.

    None for other UNets: SD1/2 keys use diffusers paths, and kohya's own SDXL UNet already has SGM paths.
    """
    config = getattr(unet, "config", None)
    if not isinstance(config, Mapping) or config.get("addition_embed_type") != "text_time":
        return None
    layers_per_block = config["layers_per_block"]
    if not isinstance(layers_per_block, int):
        raise NetworkError("SGM names need the same layers_per_block in every UNet level")
    with_attention = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    return lambda path: sgm_module_path(path, layers_per_block, with_attention)
