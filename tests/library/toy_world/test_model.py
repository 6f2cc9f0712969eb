"""The toy model has SD1's layout: our loaders, kohya's LoRA names and single files apply unchanged."""

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from library.models.sd_configs import SD15_UNET
from library.models.stable_diffusion import load_stable_diffusion, save_diffusers_folder, save_ldm_checkpoint
from library.toy_world.model import (
    LATENT_SIZE,
    TOY_WORDS,
    build_toy_model,
    rescale_latents,
    tokenizer_cache_folder,
    write_toy_tokenizer,
)
from networks import lora


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    tokenizer = write_toy_tokenizer(tokenizer_cache_folder(root / "tokenizers"))
    return root, build_toy_model(tokenizer, seed=0)


def test_every_caption_word_is_one_token(toy):
    _, model = toy
    for word in TOY_WORDS:
        assert len(model.tokenizer.tokenize(word)) == 1, word


def test_unet_has_sd15_lora_modules(toy):
    _, model = toy
    with init_empty_weights():
        sd15 = UNet2DConditionModel(**SD15_UNET)
    names = {}
    for name, unet in (("toy", model.unet), ("sd15", sd15)):
        network = lora.create_network(1.0, 4, 1, None, None, unet, conv_dim="4")
        names[name] = {m.lora_name for m in network.unet_loras}
    assert names["toy"] == names["sd15"] and len(names["toy"]) == 278


def test_single_file_and_folder_round_trip(toy):
    root, model = toy
    save_ldm_checkpoint(model, root / "toy.safetensors")
    save_diffusers_folder(model, root / "toy_folder")
    latents = torch.randn(1, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    ids = model.tokenizer(["a red star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.unet(latents, 500, model.text_encoder(ids)[0]).sample
        for source in (root / "toy.safetensors", root / "toy_folder"):
            loaded = load_stable_diffusion(source, tokenizer_cache_dir=root / "tokenizers")
            assert loaded.tokenizer.tokenize("a red star") == ["a</w>", "red</w>", "star</w>"]
            assert list(loaded.vae.config.block_out_channels) == list(model.vae.config.block_out_channels)
            result = loaded.unet(latents, 500, loaded.text_encoder(ids)[0]).sample
            torch.testing.assert_close(result, expected)


def test_rescaled_latents_decode_to_the_same_image(toy):
    _, model = toy
    vae = type(model.vae).from_config(model.vae.config)
    vae.load_state_dict(model.vae.state_dict())
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        before = vae.encode(pixels).latent_dist
        decoded_before = vae.decode(before.mean).sample
        rescale_latents(vae, 3.0)
        after = vae.encode(pixels).latent_dist
        decoded_after = vae.decode(after.mean).sample
    torch.testing.assert_close(after.mean, 3.0 * before.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after.std, 3.0 * before.std, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(decoded_after, decoded_before, rtol=1e-4, atol=1e-4)
