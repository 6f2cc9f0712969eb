"""The single-file key layout: real SD1.5/SD2.1 shapes on the meta device, and exact round trips."""

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.fileio import read_state_dict
from library.models import ldm_architecture as ldm_arch
from library.models import ldm_conversion as conv
from library.models.sd_configs import CLIP_L_TEXT, OPEN_CLIP_H_TEXT, SD15_UNET, SD21_UNET, SD_VAE
from library.models.stable_diffusion import ldm_state_dict, load_stable_diffusion

# Tensor names every released SD1.x/SD2.x single file has (A1111 and ComfyUI look them up).
KNOWN_LDM_UNET_KEYS = [
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.6.0.op.weight",
    "model.diffusion_model.input_blocks.9.0.op.weight",
    "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight",
    "model.diffusion_model.middle_block.0.in_layers.2.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.middle_block.2.out_layers.3.weight",
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.8.2.conv.weight",
    "model.diffusion_model.output_blocks.11.1.proj_out.weight",
    "model.diffusion_model.out.2.weight",
]
KNOWN_LDM_VAE_KEYS = [
    "first_stage_model.encoder.down.0.block.0.conv1.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.down.0.downsample.conv.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.up.0.block.2.conv2.weight",
    "first_stage_model.decoder.mid.block_2.norm1.weight",
    "first_stage_model.quant_conv.weight",
]


def _meta_sd(v2: bool):
    with init_empty_weights():
        unet = UNet2DConditionModel(**(SD21_UNET if v2 else SD15_UNET))
        vae = AutoencoderKL(**SD_VAE)
        text = CLIPTextModel(CLIPTextConfig(**(OPEN_CLIP_H_TEXT if v2 else CLIP_L_TEXT)))
    return unet, vae, text


@pytest.mark.parametrize("v2", [False, True], ids=["sd15", "sd21"])
def test_real_sized_key_layout_round_trips_through_diffusers_converters(v2):
    unet, vae, text = _meta_sd(v2)
    assert sum(p.numel() for p in unet.parameters()) == (865_910_724 if v2 else 859_520_964)
    ldm = conv.unet_to_ldm(unet.state_dict(), unet.config)
    ldm.update(conv.vae_to_ldm(vae.state_dict(), vae.config))
    te_ldm = (conv.open_clip_to_ldm if v2 else conv.clip_to_ldm)(text.state_dict())
    ldm.update(te_ldm)
    if v2:
        ldm.update(conv.sd2_dummy_final_layer(te_ldm))
    assert len([k for k in ldm if k.startswith(ldm_arch.UNET_PREFIX)]) == 686
    assert set(KNOWN_LDM_UNET_KEYS + KNOWN_LDM_VAE_KEYS) <= set(ldm)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)

    arch = ldm_arch.infer_architecture(ldm, v_parameterization=v2)
    unet_config = ldm_arch.unet_config_from_ldm(arch, ldm)
    for key, value in (SD21_UNET if v2 else SD15_UNET).items():
        expected = list(value) if isinstance(value, tuple) else value
        got = unet_config[key]
        assert (list(got) if isinstance(got, tuple) else got) == expected, key
    assert set(conv.convert_unet_from_ldm(ldm, unet_config)) == set(unet.state_dict())
    vae_config = ldm_arch.vae_config_from_ldm(arch, ldm)
    assert set(conv.convert_vae_from_ldm(ldm, vae_config)) == set(vae.state_dict())
    te_converted = conv.convert_text_encoder_from_ldm(ldm, text, v2)
    assert set(text.state_dict()) <= set(te_converted)
    assert arch.text_config == {
        **(OPEN_CLIP_H_TEXT if v2 else CLIP_L_TEXT),
        "projection_dim": arch.text_config["projection_dim"],
    }


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_single_file_round_trip_is_bit_exact(tiny_sd, name):
    path = tiny_sd.root / f"{name}.safetensors"
    original = read_state_dict(path)
    model = load_stable_diffusion(path, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir, keep_extra_state=True)
    rebuilt = ldm_state_dict(model)
    assert set(rebuilt) == set(original)
    for key, tensor in original.items():
        assert rebuilt[key].dtype == tensor.dtype, key
        assert torch.equal(rebuilt[key], tensor), key


def test_sd2_extra_state_holds_the_unused_openclip_layer(tiny_sd):
    model = load_stable_diffusion(
        tiny_sd.sd2_file, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir, keep_extra_state=True
    )
    last = model.text_encoder.config.num_hidden_layers
    assert f"cond_stage_model.model.transformer.resblocks.{last}.attn.in_proj_weight" in model.extra_ldm_state
    assert "cond_stage_model.model.text_projection" in model.extra_ldm_state
    assert not any(k.startswith(ldm_arch.UNET_PREFIX) for k in model.extra_ldm_state)


def test_legacy_clip_keys_without_text_model_level_are_accepted():
    sd = {
        "cond_stage_model.transformer.embeddings.token_embedding.weight": torch.zeros(1),
        "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight": torch.zeros(1),
        "model.diffusion_model.out.2.weight": torch.zeros(1),
    }
    fixed = ldm_arch.normalize_clip_keys(sd)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in fixed
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight" in fixed
    assert "model.diffusion_model.out.2.weight" in fixed


def test_canonical_clip_key_restores_the_text_model_level_of_flattened_transformers():
    assert conv.canonical_clip_key("encoder.layers.0.self_attn.q_proj.weight") == (
        "text_model.encoder.layers.0.self_attn.q_proj.weight"
    )
    assert conv.canonical_clip_key("text_model.final_layer_norm.bias") == "text_model.final_layer_norm.bias"


@pytest.mark.parametrize("student", ["bk_base", "bk_small", "bk_tiny"])
def test_block_removed_students_round_trip_through_single_files(tiny_sd, tmp_path, student):
    from library.distill.students import build_student, student_config
    from library.models.stable_diffusion import save_ldm_checkpoint

    model = load_stable_diffusion(tiny_sd.sd1_dir)
    unet, _ = build_student(model.unet, student_config(model.unet.config, student, None))
    model.unet = unet
    path = tmp_path / f"{student}.safetensors"
    save_ldm_checkpoint(model, path)
    again = load_stable_diffusion(path, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    assert (again.unet.config.mid_block_type is None) == (student != "bk_base")
    assert len(again.unet.down_blocks) == (3 if student == "bk_tiny" else 4)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, model.unet.config.cross_attention_dim)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, again.unet(x, t, ctx).sample)
