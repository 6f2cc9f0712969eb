"""Synthetic kohya LoRAs: kohya's target set and names on full-size SD1.5 shapes (meta device)."""

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.models.sd_configs import CLIP_L_TEXT, SD15_UNET
from library.synthetic_lora import LoRATarget, kohya_lora_targets, random_lora


@pytest.fixture(scope="module")
def sd15():
    with init_empty_weights():
        return UNet2DConditionModel(**SD15_UNET), CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))


def test_sd15_target_counts_match_kohya(sd15):
    # research/kohya.md §0.8, counted by running kohya's networks/lora.py: 72 TE + 192 UNet, 278 with conv_dim
    unet, text_encoder = sd15
    with_conv = kohya_lora_targets(unet, text_encoder, conv=True)
    assert sum(t.prefix == "lora_te" for t in with_conv) == 72
    assert sum(t.prefix == "lora_unet" for t in with_conv) == 278
    assert len(kohya_lora_targets(unet, None, conv=False)) == 192
    assert len({t.name for t in with_conv}) == len(with_conv)


def test_kohya_names_and_shapes(sd15):
    targets = {t.name: t for t in kohya_lora_targets(*sd15)}
    q = targets["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert (q.out_features, q.in_features, q.is_conv) == (320, 320, False)
    assert targets["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].in_features == 768
    conv = targets["lora_unet_mid_block_resnets_1_conv2"]
    assert (conv.kernel_size, conv.uses_conv_dim) == ((3, 3), True)
    proj_in = targets["lora_unet_down_blocks_0_attentions_0_proj_in"]  # SD1: a 1x1 conv, which gets network_dim
    assert (proj_in.is_conv, proj_in.uses_conv_dim) == (True, False)


def test_random_lora_layout():
    targets = [LoRATarget("lora_unet", "a.to_q", 12, 10), LoRATarget("lora_unet", "b.conv1", 8, 4, (3, 3), True)]
    sd = random_lora(targets, dim=6, alpha=3, conv_dim=2, conv_alpha=1, seed=1)
    assert sd["lora_unet_a_to_q.lora_down.weight"].shape == (6, 10)
    assert sd["lora_unet_a_to_q.lora_up.weight"].shape == (12, 6)
    assert sd["lora_unet_b_conv1.lora_down.weight"].shape == (2, 4, 3, 3)
    assert sd["lora_unet_b_conv1.lora_up.weight"].shape == (8, 2, 1, 1)
    assert sd["lora_unet_b_conv1.alpha"].item() == 1 and sd["lora_unet_a_to_q.alpha"].shape == ()
    assert all(v.dtype == torch.float16 for v in sd.values())
    spectrum = torch.linalg.svdvals(
        sd["lora_unet_a_to_q.lora_up.weight"].float() @ sd["lora_unet_a_to_q.lora_down.weight"].float()
    )
    assert spectrum[0] > 2 * spectrum[5]  # decaying, not flat
