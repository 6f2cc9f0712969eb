"""The model-family objects: what SD1 and SD2 differ in, checked against kohya's names and the loaded models."""

import pytest
import torch

from library.models.families import SD1, SD2, family_of
from library.models.stable_diffusion import load_stable_diffusion
from library.models.text_encoding import encode_tokens, tokenize_captions


def test_kohya_names_per_family():
    assert (SD1.version(False), SD1.version(True), SD2.version(False), SD2.version(True)) == (
        "sd_v1", "sd_v1_v", "sd_v2", "sd_v2_v",
    )  # fmt: skip
    assert SD2.modelspec_architecture(True) == "stable-diffusion-v2-768-v"
    assert SD2.modelspec_architecture(False) == "stable-diffusion-v2-512"
    assert SD1.modelspec_architecture(False) == "stable-diffusion-v1"
    # kohya's --tokenizer_cache_dir folders.
    assert SD1.tokenizer_folder == "openai_clip-vit-large-patch14"
    assert SD2.tokenizer_folder == "stabilityai_stable-diffusion-2"
    assert (SD1.kohya_text_encoder_prefixes, SD1.kohya_unet_prefix) == (("lora_te",), "lora_unet")


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_a_loaded_model_names_its_family_and_encodes_prompts_as_its_text_encoder(tiny_sd, version):
    model = load_stable_diffusion(getattr(tiny_sd, f"{version}_dir"))
    assert model.family is family_of(model.v2) and model.family.name == version
    ids = tokenize_captions(model.tokenizer, ["a red toy", "blue"])
    with torch.no_grad():
        hidden = model.encode_prompt(ids, clip_skip=2)
        expected = encode_tokens(model.text_encoder, ids, clip_skip=2)
    assert torch.equal(hidden, expected)
    assert model.family.unet_conditioning(hidden) == {"encoder_hidden_states": hidden}
