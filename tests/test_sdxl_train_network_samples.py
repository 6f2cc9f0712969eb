"""Sample images during sdxl_train_network.py runs (kohya's --sample_prompts) on the tiny SDXL fixture."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

import sdxl_train_network
from library.models.sdxl import load_sdxl
from library.training.sampling import SamplePrompt, parse_prompt_line
from library.training.sdxl_sampling import encode_sdxl_sample_prompts, render_sdxl_samples
from tests.test_sdxl_train_network import sdxl_argv

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

PROMPT = "sks toy --n blurry --w 64 --h 96 --s 3 --l 5 --d 5"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def _samples(out: Path, step: int) -> list[Path]:
    return sorted((out / "sample").glob(f"tiny_{step:06d}_00_*_5.png"))


def test_encoding_matches_diffusers_for_unweighted_prompts(tiny_sd):
    """An unweighted prompt is what diffusers' own SDXL encode_prompt gives (both encoders, pooled bigG)."""
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sd.sdxl_dir, local_files_only=True)
    model = load_sdxl(tiny_sd.sdxl_file, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    with torch.no_grad():
        hidden, pooled = encode_sdxl_sample_prompts(model, ["sks toy on a table", "blurry"])
        expected = pipeline.encode_prompt("sks toy on a table", negative_prompt="blurry", device="cpu")
    torch.testing.assert_close(hidden, torch.cat([expected[0], expected[1]]))
    torch.testing.assert_close(pooled, torch.cat([expected[2], expected[3]]))


def test_weighting_applies_to_each_encoder(tiny_sd):
    model = load_sdxl(tiny_sd.sdxl_file, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    with torch.no_grad():
        plain, plain_pooled = encode_sdxl_sample_prompts(model, ["sks toy", ""])
        weighted, weighted_pooled = encode_sdxl_sample_prompts(model, ["(sks:1.5) toy", ""])
    width = model.text_encoder.config.hidden_size
    assert not torch.allclose(plain[0, :, :width], weighted[0, :, :width])
    assert not torch.allclose(plain[0, :, width:], weighted[0, :, width:])
    torch.testing.assert_close(plain_pooled, weighted_pooled)  # pooled text is the unweighted one, as kohya's
    torch.testing.assert_close(plain[1], weighted[1])


@pytest.mark.parametrize("cached", [False, True], ids=["encoders", "cached_te_outputs"])
def test_samples_at_kohyas_steps_with_the_network_active(tiny_sd, data, cached):
    prompts = data / "prompts.txt"
    prompts.write_text(f"# comment\n{PROMPT}\n", encoding="utf-8")
    extra = ["--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only"] if cached else []
    sdxl_train_network.main(sdxl_argv(
        tiny_sd, data, "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--sample_at_first",
        "--sample_sampler", "euler_a", "--learning_rate", "1e-2", *extra,
    ))  # fmt: skip
    out = data / "out"
    names = sorted(p.name for p in (out / "sample").iterdir())
    assert len(names) == 2, names  # at first (step 0) and at step 2, not at step 1
    first, trained = _samples(out, 0), _samples(out, 2)
    assert len(first) == 1 and len(trained) == 1
    assert Image.open(trained[0]).size == (64, 96)  # --w, --h

    # The base model rendered outside training with the same prompt and seed: the step-0 sample
    # (network still zero) is that image exactly; the step-2 sample differs, so the trained
    # network is applied while sampling (the base weights are frozen).
    model = load_sdxl(tiny_sd.sdxl_file, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    args = argparse.Namespace(sample_sampler="euler_a", output_dir=str(data / "base"), output_name="base")
    ((base, _),) = render_sdxl_samples(
        args, torch.device("cpu"), model, model.unet, [parse_prompt_line(PROMPT)], None, 0
    )
    assert np.array_equal(_pixels(first[0]), _pixels(base))
    assert np.abs(_pixels(trained[0]) - _pixels(base)).max() > 0


def test_same_seed_same_image_and_seed_changes_it(tiny_sd, tmp_path):
    model = load_sdxl(tiny_sd.sdxl_file, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    args = argparse.Namespace(sample_sampler="ddim", output_dir=str(tmp_path), output_name=None)
    prompts = [SamplePrompt("sks toy", width=64, height=64, sample_steps=2, seed=s) for s in (3, 3, 4)]
    state = torch.get_rng_state()
    paths = [path for path, _ in render_sdxl_samples(args, torch.device("cpu"), model, model.unet, prompts, 1, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # training's random stream is untouched
    assert [p.name.split("_")[0] for p in paths] == ["e000001"] * 3  # kohya's names without --output_name
    assert np.array_equal(_pixels(paths[0]), _pixels(paths[1]))
    assert not np.array_equal(_pixels(paths[0]), _pixels(paths[2]))


def test_half_precision_run_samples_with_a_float32_vae_decode(tiny_sd, data):
    """fp16 latents from the UNet are decoded in float32 (no dtype clash on the CPU, no fp16 VAE overflow)."""
    prompts = data / "prompts.txt"
    prompts.write_text(PROMPT + "\n", encoding="utf-8")
    sdxl_train_network.main(sdxl_argv(
        tiny_sd, data, "--sample_prompts", str(prompts), "--sample_every_n_steps", "1", "--max_train_steps", "1",
        "--mixed_precision", "fp16", "--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only",
    ))  # fmt: skip
    (sample,) = _samples(data / "out", 1)
    model = load_sdxl(tiny_sd.sdxl_file, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    args = argparse.Namespace(sample_sampler="ddim", output_dir=str(data / "base"), output_name="base")
    ((base, _),) = render_sdxl_samples(
        args, torch.device("cpu"), model, model.unet, [parse_prompt_line(PROMPT)], None, 0
    )
    # the fp16 run's image is the float32 base model's up to half-precision rounding and one LoRA step
    # (measured: mean difference 1 of 255, the image's spread 51)
    assert _pixels(sample).std() > 1 and np.abs(_pixels(sample) - _pixels(base)).mean() < 8
