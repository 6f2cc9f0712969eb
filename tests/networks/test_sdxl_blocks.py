"""Block-wise --network_args on SDXL: kohya's 23 blocks (block dims/alphas, lr weights) on real SDXL shapes.

The expected blocks are re-stated here from kohya sd-scripts v0.10.1 ``networks/lora.py`` (``get_block_index``
with ``is_sdxl``, ``get_block_dims_and_alphas``, ``get_block_lr_weight``), and, independently of any name,
from where each diffusers module sits in SDXL's SGM UNet; nothing is read from our block code.
"""

import math

import pytest
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.models.sd_configs import CLIP_L_TEXT, SDXL_UNET
from networks import dylora, lilora, lora, lowrank_ffn
from networks.network_args import NetworkArgsError
from networks.targets import layer_targets
from tests.kohya_reference import kohya_sdxl_block

SDXL_BLOCK_COUNT = 23  # kohya: 1 (time embedding) + 9 input + 3 middle + 9 output + 1 (out)


def sgm_block_of_diffusers_path(path: str, layers: int = 2) -> int:
    """The kohya block of a diffusers SDXL UNet module, from SGM's layout: input_blocks.0 is conv_in, then per
    level ``layers`` (resnet[, attention]) slots and a downsampler slot; middle_block is resnet, attention,
    resnet; output_blocks have ``layers + 1`` slots per level (the upsampler shares the last)."""
    parts = path.split(".")
    if parts[0] == "down_blocks":
        level, kind, j = int(parts[1]), parts[2], int(parts[3])
        slot = (layers + 1) * level + (layers + 1 if kind == "downsamplers" else 1 + j)
        return 1 + slot
    if parts[0] == "mid_block":
        return 10 + (1 if parts[1] == "attentions" else 2 * int(parts[2]))
    if parts[0] == "up_blocks":
        level, kind, j = int(parts[1]), parts[2], int(parts[3])
        return 13 + (layers + 1) * level + (layers if kind == "upsamplers" else j)
    raise AssertionError(f"no kohya block for {path}")


@pytest.fixture(scope="module")
def real_sdxl():
    """SDXL's UNet (and CLIP-L as a text encoder) at full size on the meta device."""
    with init_empty_weights():
        return CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), UNet2DConditionModel(**SDXL_UNET)


def as_arg(values) -> str:
    return ",".join(map(str, values))


def test_every_real_sdxl_module_gets_kohyas_block(real_sdxl):
    text_encoder, unet = real_sdxl
    paths = {id(module): path for path, module in unet.named_modules()}
    targets = layer_targets(text_encoder, unet, convs=True)
    unet_targets = [t for t in targets if not t.is_text_encoder]
    assert len(unet_targets) > 722  # LoRA's 722 layers plus the convs
    for target in unet_targets:
        path = paths[id(target.module)]
        assert target.block == kohya_sdxl_block(target.name) == sgm_block_of_diffusers_path(path), target.name
    assert all(t.block == -1 for t in targets if t.is_text_encoder)
    # input_blocks 0 (conv_in), time embedding and out hold no adapted layer, as in kohya
    assert {t.block for t in unet_targets} == set(range(2, 22))


def test_block_dims_and_alphas_set_each_modules_rank(real_sdxl):
    dims = [1 + i % 5 for i in range(SDXL_BLOCK_COUNT)]
    dims[5] = 0  # input_blocks 4: no Linear module there
    conv_dims = [1 + (i * 3) % 4 for i in range(SDXL_BLOCK_COUNT)]
    alphas, conv_alphas = [0.5 * d + 1 for d in dims], [0.25 * d for d in conv_dims]
    network = lora.create_network(
        1.0, 8, 2, None, *real_sdxl,
        block_dims=as_arg(dims), block_alphas=as_arg(alphas),
        conv_block_dims=as_arg(conv_dims), conv_block_alphas=as_arg(conv_alphas),
    )  # fmt: skip
    assert all((m.lora_dim, m.alpha.item()) == (8, 2) for m in network.text_encoder_loras)
    seen = set()
    for module in network.unet_loras:
        block = kohya_sdxl_block(module.lora_name)
        three_by_three = module.lora_down.weight.shape[2:] == (3, 3)
        expected = (conv_dims[block], conv_alphas[block]) if three_by_three else (dims[block], alphas[block])
        assert (module.lora_dim, module.alpha.item()) == expected, module.lora_name
        seen.add((block, three_by_three))
    assert (5, True) in seen and (5, False) not in seen  # rank 0 leaves out only that block's Linear layers


def test_lr_weights_give_kohyas_param_groups(real_sdxl):
    down, mid = [1.0, 0.0, 0.5], [2.0, 0.25]  # kohya fills missing trailing values with 1
    up = [i / 8 for i in range(9)]  # "linear" over SDXL's 9 output blocks: i / (9 - 1)
    expected = [1.0] + down + [1.0] * 6 + mid + [1.0] + up + [1.0]  # + 1.0 for time embedding and out
    assert len(expected) == SDXL_BLOCK_COUNT
    network = lora.create_network(
        1.0, 4, 1, None, *real_sdxl,
        conv_dim="2", down_lr_weight=as_arg(down), mid_lr_weight=as_arg(mid), up_lr_weight="linear",
    )  # fmt: skip
    modules_by_block = {}
    for module in network.unet_loras:
        modules_by_block.setdefault(kohya_sdxl_block(module.lora_name), []).append(module)
    # weight 0: kohya builds no module (input_blocks 1 and output_blocks 0)
    assert set(modules_by_block) == set(range(2, 22)) - {2, 13}
    groups, names = network.prepare_optimizer_params(None, 1e-4, None)
    assert sorted(int(n.removeprefix("unet_block")) for n in names) == sorted(modules_by_block)
    for group, name in zip(groups, names):
        block = int(name.removeprefix("unet_block"))
        assert group["lr"] == pytest.approx(1e-4 * expected[block])
        assert {id(p) for p in group["params"]} == {id(p) for m in modules_by_block[block] for p in m.parameters()}


def test_network_from_sdxl_weights_keeps_ranks_and_takes_sdxl_lr_weights(real_sdxl):
    dims = [1 + i % 4 for i in range(SDXL_BLOCK_COUNT)]
    built = lora.create_network(1.0, 4, 1, None, None, real_sdxl[1], block_dims=as_arg(dims))
    again, _ = lora.create_network_from_weights(
        1.0, None, None, None, real_sdxl[1], weights_sd=built.state_dict(), mid_lr_weight="1,0.5,1"
    )
    assert {m.lora_name: m.lora_dim for m in again.unet_loras} == {m.lora_name: m.lora_dim for m in built.unet_loras}
    assert again.block_lr_weight == [1.0] * 11 + [0.5] + [1.0] * 11  # middle_block 1 is block 11


def test_lr_weight_presets_span_sdxls_nine_blocks(real_sdxl):
    network = lora.create_network(1.0, 4, 1, None, None, real_sdxl[1], down_lr_weight="cosine+0.5")
    cosine = [math.sin(math.pi * (i / 8) / 2) + 0.5 for i in reversed(range(9))]  # kohya's get_list("cosine")
    assert network.block_lr_weight == pytest.approx([1.0] + cosine + [1.0] * 13)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"block_dims": as_arg([4] * 25)}, "block_dims: 23 values needed on SDXL (time embedding, input_blocks 0..8"),
        ({"block_dims": as_arg([4] * 23), "block_alphas": "1,2"}, "block_alphas: 23 values needed on SDXL"),
        ({"conv_block_dims": as_arg([4] * 22)}, "conv_block_dims: 23 values needed on SDXL"),
        ({"conv_dim": "4", "conv_block_dims": as_arg([4] * 23), "conv_block_alphas": "1"}, "conv_block_alphas: 23"),
        ({"down_lr_weight": as_arg([1] * 12)}, "down_lr_weight on SDXL: 12 values given, at most 9"),
        ({"up_lr_weight": as_arg([1] * 10)}, "up_lr_weight on SDXL: 10 values given, at most 9"),
    ],
)
def test_wrong_length_lists_are_refused_in_one_line(real_sdxl, args, message):
    with pytest.raises(NetworkArgsError) as err:
        lora.create_network(1.0, 4, 1, None, *real_sdxl, **args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sd_sized_lists_are_refused_on_sdxl_and_sdxl_sized_on_sd(real_sdxl, full_size):
    with pytest.raises(NetworkArgsError, match="mid_lr_weight on SD1/2: 3 values given, at most 1"):
        lora.create_network(1.0, 4, 1, None, *full_size["sd15"], mid_lr_weight="1,1,1")
    with pytest.raises(NetworkArgsError, match="block_dims: 25 values needed on SD1/2.*got 23"):
        lora.create_network(1.0, 4, 1, None, *full_size["sd15"], block_dims=as_arg([4] * 23))


def test_lilora_drops_and_weights_sdxls_blocks(real_sdxl):
    network = lilora.create_network(
        1.0, 4, 1, None, None, real_sdxl[1], down_lr_weight="1,1,1,1,0", up_lr_weight="1,1,0.5"
    )
    blocks = {kohya_sdxl_block(m.lora_name) for m in network.unet_loras}
    assert blocks == {6, 8, 9, 11, 13, 14, 15, 16, 17, 18}  # attention blocks but input_blocks 4 (weight 0)
    groups, names = network.prepare_optimizer_params(None, 1e-4, None)
    lrs = {int(name.removeprefix("unet_block")): group["lr"] for group, name in zip(groups, names)}
    assert lrs == pytest.approx({block: 0.5e-4 if block == 15 else 1e-4 for block in blocks})


def test_dylora_takes_sdxl_block_dims(real_sdxl):
    dims = [2 * (1 + i % 2) for i in range(SDXL_BLOCK_COUNT)]
    network = dylora.create_network(1.0, 4, 1, None, None, real_sdxl[1], block_dims=as_arg(dims), unit="2")
    assert all(m.lora_dim == dims[kohya_sdxl_block(m.lora_name)] for m in network.unet_loras)


def test_lowrank_ffn_block_names_are_refused_on_sdxl(real_sdxl):
    with pytest.raises(NetworkArgsError, match="blocks: block names are SD1/2's; on SDXL leave blocks unset"):
        lowrank_ffn.create_network(1.0, 64, None, None, None, real_sdxl[1], blocks="IN07,MID")
