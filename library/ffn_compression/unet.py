"""UNets whose feed-forwards have their own hidden widths, and their diffusers folders.

A stock ``UNet2DConditionModel`` config cannot give an FFN a width (``BasicTransformerBlock`` has
``ff_inner_dim``, but the UNet config does not pass it down). A compressed UNet is therefore the
stock config plus one key, ``ffn_widths`` (``{"down_blocks.2.attentions.0.transformer_blocks.0.ff": 960,
…}``), with diffusers' own ``FeedForward(inner_dim=k)`` modules in those places. Stock diffusers
ignores the key and then refuses the weights (shape mismatch, naming the tensor): it cannot
misload a compressed folder. :func:`load_compressed_unet` reads it; importing this module registers
it as a UNet variant, so ``load_stable_diffusion`` (and so train_network.py) uses it for any folder
whose UNet config has the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from diffusers.models.attention import FeedForward

from library.errors import CheckpointError, ConfigError
from library.fileio import read_state_dict
from library.models.unet_variants import UNetVariant, register_unet_variant
from networks.lowrank_ffn import LowRankFFNNetwork, ffn_layers

FFN_WIDTHS_KEY = "ffn_widths"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def ffn_widths(unet: UNet2DConditionModel) -> dict[str, int]:
    """``{module path: hidden width}`` of the UNet's narrowed FFNs (empty for a stock UNet)."""
    return dict(unet.config.get(FFN_WIDTHS_KEY) or {})


def narrow_feed_forwards(unet: UNet2DConditionModel, widths: Mapping[str, int]) -> None:
    """Replace the FFNs at the given paths by (untrained) diffusers FFNs of those widths; record the widths."""
    for path, width in widths.items():
        try:
            proj, out = ffn_layers(path, unet.get_submodule(path))
        except AttributeError:
            raise CheckpointError(f"'{FFN_WIDTHS_KEY}' names {path}, which this UNet does not have") from None
        parent_path, _, child = path.rpartition(".")
        bias = out.bias is not None
        with torch.device(proj.weight.device):
            narrow = FeedForward(proj.in_features, out.out_features, inner_dim=int(width), bias=bias)
        narrow.to(proj.weight.dtype)
        setattr(unet.get_submodule(parent_path), child, narrow)
    unet.register_to_config(**{FFN_WIDTHS_KEY: {**ffn_widths(unet), **widths}})


@torch.no_grad()
def compress_unet(unet: UNet2DConditionModel, network: LowRankFFNNetwork) -> UNet2DConditionModel:
    """Put the network's narrow FFNs into ``unet`` for good (in place; the network is detached first)."""
    network.restore()
    paths = {id(module): path for path, module in unet.named_modules()}
    modules = {paths[id(m.original)]: m for m in network.ffn_modules if id(m.original) in paths}
    if len(modules) != len(network.ffn_modules):
        raise ConfigError(
            "--network_weights: the narrow-FFN network was built on another UNet than the one to compress"
        )
    narrow_feed_forwards(unet, {path: m.hidden_width for path, m in modules.items()})
    for path, module in modules.items():
        unet.get_submodule(path).net.load_state_dict(module.net.state_dict())
    return unet


def build_compressed_unet(config: Mapping, device: torch.device | str | None = None) -> UNet2DConditionModel:
    """A UNet with the FFN widths of ``config`` (a stock config plus ``ffn_widths``), not initialised on meta."""
    config = dict(config)
    widths = config.pop(FFN_WIDTHS_KEY, None) or {}
    with torch.device(device) if device is not None else init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
        narrow_feed_forwards(unet, widths)
    return unet


def load_compressed_unet(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> UNet2DConditionModel:
    """Load a UNet folder written with narrowed FFNs (also a stock one): ``config.json`` + safetensors."""
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"'{folder}' is not a UNet folder with config.json and {WEIGHTS_NAME}")
    unet = build_compressed_unet(json.loads(config_path.read_text()))
    state = read_state_dict(weights_path)
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CheckpointError(f"'{weights_path}' does not fit its config.json: {first}") from err
    unet = unet.to(dtype) if dtype is not None else unet
    return unet.requires_grad_(False).eval()


register_unet_variant(
    UNetVariant(
        FFN_WIDTHS_KEY,
        load_compressed_unet,
        "this UNet has narrowed feed-forwards, which no single-file (LDM) loader can build: "
        "save it as a diffusers folder (tools/compress_ffn.py export)",
    )
)
