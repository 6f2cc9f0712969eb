"""The SDXL family: loading folders and SGM files offline, tokenizers, prompt encoding, wrong-family errors."""

import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from library.errors import CheckpointError, TokenizerNotFoundError
from library.models.sdxl import SDXL, load_sdxl, save_sdxl_diffusers_folder, save_sgm_checkpoint
from library.models.sdxl_conditioning import encode_sdxl_prompt, sdxl_unet_conditioning, size_time_ids
from library.models.stable_diffusion import load_stable_diffusion
from library.models.text_encoding import tokenize_captions

CAPTIONS = ["a photo of sks toy, red cube", "a blue ball on the table in the room"]


def _unet_output(model, seed=0):
    ids = [tokenize_captions(tok, CAPTIONS) for tok in (model.tokenizer, model.tokenizer_2)]
    hidden, pooled = encode_sdxl_prompt(model.text_encoder, model.text_encoder_2, *ids)
    time_ids = size_time_ids([(64, 64), (128, 64)], [(0, 0), (0, 8)], [(64, 64), (64, 64)])
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return model.unet(sample, torch.tensor([10, 500]), **sdxl_unet_conditioning(hidden, pooled, time_ids)).sample


def test_folder_and_single_file_give_identical_outputs(tiny_sd):
    folder = load_sdxl(tiny_sd.sdxl_dir)
    single = load_sdxl(tiny_sd.sdxl_file, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    with torch.no_grad():
        assert torch.equal(_unet_output(folder), _unet_output(single))
    assert single.tokenizer_2.pad_token == "!" and single.tokenizer.pad_token == "<|endoftext|>"
    assert folder.family is SDXL and folder.base_model_version == "sdxl_base_v1-0"


def test_prompt_encoding_and_conditioning_match_the_diffusers_pipeline(tiny_sd):
    """Our penultimate-layer concat, pooled text and time ids against StableDiffusionXLPipeline's own."""
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sd.sdxl_dir)
    model = load_sdxl(tiny_sd.sdxl_dir)
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(CAPTIONS, do_classifier_free_guidance=False)
        ids = [tokenize_captions(tok, CAPTIONS) for tok in (model.tokenizer, model.tokenizer_2)]
        hidden, our_pooled = encode_sdxl_prompt(model.text_encoder, model.text_encoder_2, *ids)
        torch.testing.assert_close(hidden, embeds)
        torch.testing.assert_close(our_pooled, pooled)
        theirs = pipeline._get_add_time_ids(
            (128, 64),
            (0, 8),
            (64, 64),
            dtype=torch.float32,
            text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim,
        )
    assert torch.equal(size_time_ids([(128, 64)], [(0, 8)], [(64, 64)]), theirs)


def test_long_captions_use_kohya_chunks_and_the_first_chunk_pools(tiny_sd):
    model = load_sdxl(tiny_sd.sdxl_dir)
    ids = [tokenize_captions(tok, CAPTIONS, max_token_length=150) for tok in (model.tokenizer, model.tokenizer_2)]
    short = [tokenize_captions(tok, CAPTIONS) for tok in (model.tokenizer, model.tokenizer_2)]
    with torch.no_grad():
        hidden, pooled = encode_sdxl_prompt(model.text_encoder, model.text_encoder_2, *ids)
        _, short_pooled = encode_sdxl_prompt(model.text_encoder, model.text_encoder_2, *short)
    assert hidden.shape == (2, 152, model.unet.config.cross_attention_dim)
    assert torch.equal(ids[1][:, 0, :-1], short[1][:, 0, :-1])
    torch.testing.assert_close(pooled, short_pooled)


def test_saved_folder_and_single_file_reload_identically(tiny_sd, tmp_path):
    model = load_sdxl(tiny_sd.sdxl_file, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    save_sdxl_diffusers_folder(model, tmp_path / "out")
    save_sgm_checkpoint(model, tmp_path / "out.ckpt")
    with torch.no_grad():
        expected = _unet_output(model)
        assert torch.equal(_unet_output(load_sdxl(tmp_path / "out")), expected)
        again = load_sdxl(tmp_path / "out.ckpt", tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
        assert torch.equal(_unet_output(again), expected)


def test_saved_folder_runs_in_the_sdxl_pipeline(tiny_sd):
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sd.sdxl_dir)
    image = pipeline("a red cube", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("source", ["sd1_file", "sd2_file", "sd1_dir"])
def test_sd1_or_sd2_model_given_for_sdxl_is_refused_in_one_line(tiny_sd, source):
    with pytest.raises(CheckpointError, match="this script needs an SDXL model|SD1.x/SD2.x folder") as err:
        load_sdxl(getattr(tiny_sd, source), tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("source", ["sdxl_file", "sdxl_dir"])
def test_sdxl_model_given_for_sd1_is_refused_in_one_line(tiny_sd, source):
    with pytest.raises(CheckpointError, match="is an SDXL (checkpoint|folder): train it with sdxl_train_network.py"):
        load_stable_diffusion(getattr(tiny_sd, source), tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)


def test_missing_second_tokenizer_names_kohyas_folder(tiny_sd, tmp_path):
    cache = tmp_path / "tokenizers"
    shutil.copytree(tiny_sd.tokenizer_cache_dir / SDXL.tokenizer_folder, cache / SDXL.tokenizer_folder)
    with pytest.raises(TokenizerNotFoundError, match="laion_CLIP-ViT-bigG-14-laion2B-39B-b160k/vocab.json"):
        load_sdxl(tiny_sd.sdxl_file, tokenizer_cache_dir=cache)
    with pytest.raises(TokenizerNotFoundError, match="needs --tokenizer_cache_dir"):
        load_sdxl(tiny_sd.sdxl_file)


def test_tiny_sdxl_is_deterministic(tiny_sd, tmp_path):
    from library.tiny_sdxl import write_tiny_sdxl

    write_tiny_sdxl(tmp_path, tmp_path / "tokenizers", seed=0)
    assert (tmp_path / "sdxl.safetensors").read_bytes() == tiny_sd.sdxl_file.read_bytes()
    unet = load_sdxl(tmp_path / "sdxl").unet.config
    assert unet.down_block_types[0] == "DownBlock2D" and unet.addition_embed_type == "text_time"
    assert list(unet.transformer_layers_per_block) == [1, 1, 2]
