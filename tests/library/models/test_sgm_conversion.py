"""The SDXL single-file (SGM) layout: real SDXL shapes on the meta device, and exact round trips."""

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.fileio import read_state_dict
from library.models import ldm_conversion as conv
from library.models import sgm_conversion as sgm
from library.models.sd_configs import CLIP_L_TEXT, OPEN_CLIP_BIGG_TEXT, SD_VAE, SDXL_UNET
from library.models.sdxl import load_sdxl, sgm_state_dict

# Tensor names of the released sd_xl_base_1.0.safetensors (what A1111, ComfyUI and kohya look up).
KNOWN_SGM_KEYS = [
    "model.diffusion_model.label_emb.0.0.weight",
    "model.diffusion_model.label_emb.0.2.bias",
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.6.0.op.weight",
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.2.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight",
    "model.diffusion_model.output_blocks.0.1.transformer_blocks.9.norm3.weight",
    "model.diffusion_model.output_blocks.2.2.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.8.0.out_layers.3.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight",
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
    "conditioner.embedders.1.model.ln_final.weight",
    "conditioner.embedders.1.model.positional_embedding",
    "conditioner.embedders.1.model.text_projection",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
]


def test_real_sized_sdxl_layout_round_trips_through_diffusers_converters():
    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SD_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIGG_TEXT))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL 1.0 base UNet
    state = sgm.unet_to_sgm(unet.state_dict(), unet.config)
    state.update(conv.vae_to_ldm(vae.state_dict(), vae.config))
    state.update(sgm.text_encoder_1_to_sgm(te1.state_dict()))
    state.update(sgm.text_encoder_2_to_sgm(te2.state_dict()))
    assert set(KNOWN_SGM_KEYS) <= set(state)
    assert state["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3840, 1280)
    assert sgm.checkpoint_family(state) == "sdxl"

    arch, te2_config = sgm.infer_sdxl_architecture(state)
    config = sgm.unet_config_from_sgm(arch, state, te2_config["projection_dim"])
    for key, value in SDXL_UNET.items():
        if key == "addition_embed_type_num_heads":
            continue
        got = config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (
            list(value) if isinstance(value, tuple) else value
        ), key
    assert set(sgm.convert_unet_from_sgm(state, config)) == set(unet.state_dict())
    assert arch.text_config == CLIP_L_TEXT
    assert te2_config == OPEN_CLIP_BIGG_TEXT
    te1_state, te2_state = sgm.convert_text_encoders_from_sgm(state, te2)
    assert set(te1.state_dict()) <= set(te1_state)
    assert set(te2.state_dict()) <= set(te2_state)


def test_sgm_file_round_trip_is_bit_exact(tiny_sd):
    original = read_state_dict(tiny_sd.sdxl_file)
    model = load_sdxl(tiny_sd.sdxl_file, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir, keep_extra_state=True)
    rebuilt = sgm_state_dict(model)
    assert set(rebuilt) == set(original)
    for key, tensor in original.items():
        assert rebuilt[key].dtype == tensor.dtype and torch.equal(rebuilt[key], tensor), key


def test_extra_tensors_of_a_released_file_survive_a_round_trip(tiny_sd, tmp_path):
    from library.fileio import save_state_dict

    state = read_state_dict(tiny_sd.sdxl_file)
    state["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)  # in sd_xl_base_1.0, unused
    path = tmp_path / "with_logit_scale.safetensors"
    save_state_dict(state, path)
    model = load_sdxl(path, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir, keep_extra_state=True)
    assert set(model.extra_ldm_state) == {"conditioner.embedders.1.model.logit_scale"}
    assert set(sgm_state_dict(model)) == set(state)


def test_diffusers_own_single_file_loader_reads_our_sgm_file_as_our_folder(tiny_sd):
    """Independent of our converters: diffusers maps the SGM file we wrote to the folder's weights."""
    pipeline = StableDiffusionXLPipeline.from_single_file(
        str(tiny_sd.sdxl_file), config=str(tiny_sd.sdxl_dir), local_files_only=True
    )
    ours = load_sdxl(tiny_sd.sdxl_dir)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        theirs, mine = getattr(pipeline, part).state_dict(), getattr(ours, part).state_dict()
        assert set(theirs) == set(mine), part
        assert all(torch.equal(theirs[k], mine[k]) for k in mine), part


def test_family_is_read_from_the_tensors(tiny_sd):
    assert sgm.checkpoint_family(read_state_dict(tiny_sd.sdxl_file)) == "sdxl"
    assert sgm.checkpoint_family(read_state_dict(tiny_sd.sd1_file)) == "sd1"
    assert sgm.checkpoint_family(read_state_dict(tiny_sd.sd2_file)) == "sd2"
    assert sgm.checkpoint_family({"lora_unet_x.alpha": torch.tensor(1.0)}) is None
