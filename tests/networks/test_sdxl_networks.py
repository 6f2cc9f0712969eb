"""LoRA/LoCon on SDXL: kohya's SDXL key names (SGM UNet paths, lora_te1/lora_te2), diffusers loads the files."""

import copy

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.fileio import read_state_dict
from library.models.sd_configs import CLIP_L_TEXT, OPEN_CLIP_BIGG_TEXT, SDXL_UNET
from library.models.sdxl import load_sdxl
from networks import lora
from networks.sgm_names import sgm_module_path
from networks.targets import layer_targets
from tests.kohya_reference import kohya_sdxl_module_names, sgm_paths_by_diffusers_converter
from tests.networks.helpers import perturb
from tests.networks.tolerances import assert_close

# Names from kohya SDXL LoRA files in the wild (and kohya's log: "create LoRA for U-Net: 722 modules").
KNOWN_SDXL_NAMES = [
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_input_blocks_4_1_proj_in",
    "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2",
    "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
    "lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_0_proj",
    "lora_unet_output_blocks_5_1_proj_out",
    "lora_te1_text_model_encoder_layers_11_self_attn_q_proj",
    "lora_te2_text_model_encoder_layers_31_mlp_fc2",
]
KNOWN_SDXL_CONV_NAMES = [
    "lora_unet_input_blocks_1_0_in_layers_2",
    "lora_unet_input_blocks_1_0_emb_layers_1",
    "lora_unet_input_blocks_3_0_op",
    "lora_unet_input_blocks_4_0_skip_connection",
    "lora_unet_middle_block_2_out_layers_3",
    "lora_unet_output_blocks_2_2_conv",
    "lora_unet_output_blocks_5_2_conv",
    "lora_unet_output_blocks_8_0_skip_connection",
]


@pytest.fixture(scope="module")
def sdxl(tiny_sd):
    return load_sdxl(tiny_sd.sdxl_dir)


def test_real_sized_sdxl_gets_kohyas_names_and_counts():
    with init_empty_weights():
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIGG_TEXT))
        unet = UNet2DConditionModel(**SDXL_UNET)
    names = [t.name for t in layer_targets([te1, te2], unet, convs=False)]
    assert sum(n.startswith("lora_unet_") for n in names) == 722
    assert sum(n.startswith("lora_te1_") for n in names) == 72
    assert sum(n.startswith("lora_te2_") for n in names) == 192
    assert set(KNOWN_SDXL_NAMES) <= set(names)
    with_convs = {t.name for t in layer_targets([te1, te2], unet, convs=True)}
    assert set(KNOWN_SDXL_CONV_NAMES) <= with_convs


@pytest.mark.parametrize("convs", [False, True], ids=["lora", "locon"])
def test_tiny_sdxl_names_match_the_reference_from_diffusers_converter(sdxl, tiny_sd, convs):
    sgm_unet = {k: v for k, v in read_state_dict(tiny_sd.sdxl_file).items() if k.startswith("model.diffusion_model.")}
    sgm_paths = sgm_paths_by_diffusers_converter(sgm_unet, sdxl.unet.config)
    expected = kohya_sdxl_module_names(sdxl.text_encoders, sdxl.unet, sgm_paths, convs)
    network = lora.create_network(
        1.0, 4, 1, None, sdxl.text_encoders, sdxl.unet, **({"conv_dim": "2"} if convs else {})
    )
    assert {m.lora_name for m in network.adapters} == expected


def test_unknown_sdxl_path_is_a_network_error():
    with pytest.raises(ValueError, match="no SGM name for UNet module 'foo.bar'"):
        sgm_module_path("foo.bar", 2, set())


def _outputs(text_encoders, unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 77), generator=generator)
    latents = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator, dtype=torch.float64)
    added = {
        "text_embeds": torch.randn(
            2, text_encoders[1].config.projection_dim, generator=generator, dtype=torch.float64
        ),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [128, 64, 0, 8, 64, 64]], dtype=torch.float64),
    }
    with torch.no_grad():
        te1 = text_encoders[0](ids)[0]
        te2 = text_encoders[1](ids, output_hidden_states=True)
        sample = unet(latents, torch.tensor([10, 500]), context, added_cond_kwargs=added).sample
    return te1, te2.hidden_states[-2], te2.text_embeds, sample


def _copies(sdxl):
    te1, te2, unet = (copy.deepcopy(m) for m in (sdxl.text_encoder, sdxl.text_encoder_2, sdxl.unet))
    return [te1, te2], unet.to(torch.float64)  # see tests/networks/tolerances.py: CLIP stays float32


@pytest.mark.parametrize("network_args", [{}, {"conv_dim": "2", "conv_alpha": "1"}], ids=["lora", "locon"])
def test_diffusers_sdxl_pipeline_loads_the_file_and_computes_as_we_do(sdxl, tmp_path, network_args):
    encoders, unet = _copies(sdxl)
    base = _outputs(encoders, unet)
    network = perturb(lora.create_network(1.0, 4, 2, None, encoders, unet, **network_args))
    path = tmp_path / "sdxl_lora.safetensors"
    network.save_weights(path, None, {})
    network.apply_to(encoders, unet)
    network.eval()
    expected = _outputs(encoders, unet)
    assert all(not torch.allclose(a, b) for a, b in zip(expected, base))  # every part is changed by the network

    their_encoders, their_unet = _copies(sdxl)
    pipeline = StableDiffusionXLPipeline(
        vae=sdxl.vae, text_encoder=their_encoders[0], text_encoder_2=their_encoders[1], tokenizer=sdxl.tokenizer,
        tokenizer_2=sdxl.tokenizer_2, unet=their_unet, scheduler=None,
    )  # fmt: skip
    pipeline.load_lora_weights(str(tmp_path), weight_name=path.name)  # raises on keys it cannot map
    for actual, wanted in zip(_outputs(their_encoders, their_unet), expected):
        assert_close(actual, wanted)

    plain_encoders, plain_unet = _copies(sdxl)
    again, weights = lora.create_network_from_weights(1.0, path, None, plain_encoders, plain_unet)
    again.load_weights(weights)
    again.to(torch.float64).apply_to(plain_encoders, plain_unet)
    for actual, wanted in zip(_outputs(plain_encoders, plain_unet), expected):
        assert_close(actual, wanted)
