"""Size and compute of a UNet: parameters and multiply-accumulates per forward, counted without weights.

MACs come from ``torch.utils.flop_counter`` on the meta device, so a full-size UNet costs no
memory and well under a second. Attention score and value matmuls are included (thop, which
BK-SDM's published MACs use, leaves them out; distill.md §1.4 gives both).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

CONTEXT_TOKENS = 77


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# On CPU, scaled_dot_product_attention dispatches to an op flop_counter has no formula for; on the
# meta device it decomposes into counted matmuls. Registering the CPU op counts it either way.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(
    unet: UNet2DConditionModel | Mapping, latent_height: int, latent_width: int | None = None, batch: int = 1
) -> int:
    """MACs of one UNet forward (a model, or a config to build on the meta device)."""
    if not isinstance(unet, nn.Module):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet)
    device = next(unet.parameters()).device
    latent_width = latent_height if latent_width is None else latent_width
    context_dim = unet.config.cross_attention_dim
    context_dim = context_dim if isinstance(context_dim, int) else context_dim[0]
    sample = torch.zeros(batch, unet.config.in_channels, latent_height, latent_width, device=device)
    context = torch.zeros(batch, CONTEXT_TOKENS, context_dim, device=device)
    timestep = torch.full((batch,), 500, device=device)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        unet(sample, timestep, context, **extra_conditioning(unet, batch, device))
    return counter.get_total_flops() // 2


def extra_conditioning(unet: UNet2DConditionModel, batch: int, device) -> dict:
    """SDXL's ``added_cond_kwargs`` (zero pooled text and size numbers); nothing for SD1.x/SD2.x."""
    config = unet.config
    if config.addition_embed_type != "text_time":
        return {}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "added_cond_kwargs": {
            "text_embeds": torch.zeros(batch, pooled, device=device),
            "time_ids": torch.zeros(batch, 6, device=device),
        }
    }
