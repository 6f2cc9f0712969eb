"""bench_cpu_levers' partly narrow levers: the named blocks keep float32 copies, the rest stays fp16, and the
step is the float32 model's bit for bit."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from bench.bench_cpu_levers import FLOAT32_BLOCKS, variant, weights_gib


@pytest.fixture
def four_level_unet():
    """SD's block layout (3 cross-attention levels, one plain) at toy width, weights rounded to fp16."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8, 8, 8), layers_per_block=1, cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )  # fmt: skip
    return unet.half().float().requires_grad_(False)


def _gradient(unet) -> torch.Tensor:
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    context = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(2))
    unet(latents, torch.tensor([500]), context).sample.pow(2).mean().backward()
    return latents.grad


@pytest.mark.parametrize("lever", ["narrow_low_f32", "narrow_lower_f32"])
def test_partly_narrow_levers_keep_the_named_blocks_float32(four_level_unet, lever):
    model, _, _ = variant(four_level_unet, lever)
    kept = FLOAT32_BLOCKS[lever]
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name != "conv_in":
            expected = torch.float32 if name.startswith(kept) else torch.float16
            assert module.weight.dtype == expected, name
    narrow, _, _ = variant(four_level_unet, "narrow")
    assert weights_gib(narrow) < weights_gib(model) < weights_gib(four_level_unet)
    assert torch.equal(_gradient(model), _gradient(four_level_unet))
