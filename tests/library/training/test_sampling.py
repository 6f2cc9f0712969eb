"""kohya prompt files and sample image generation."""

import json
import re

import pytest
import torch

from library.errors import ConfigError
from library.models.stable_diffusion import load_stable_diffusion
from library.training.sampling import (
    SamplePrompt,
    generate_samples,
    load_sample_prompts,
    make_sampler,
    parse_prompt_line,
    sample_file_name,
)


def test_prompt_line_options():
    p = parse_prompt_line("sks toy on a table --n blurry, lowres --w 770 --h 512 --s 20 --l 6.5 --d 42 --ss euler_a")
    assert p == SamplePrompt("sks toy on a table", "blurry, lowres", 768, 512, 20, 6.5, 42, "euler_a")
    assert parse_prompt_line("x --s 5000").sample_steps == 1000
    assert parse_prompt_line("x --w 10").width == 64
    with pytest.raises(ConfigError, match="--d"):
        parse_prompt_line("x --d soon")


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\n\nfirst --d 1\nsecond --n bad\n", encoding="utf-8")
    assert [p.prompt for p in load_sample_prompts(txt)] == ["first", "second"]
    toml_file = tmp_path / "p.toml"
    toml_file.write_text(
        '[prompt]\nwidth = 256\nsample_steps = 12\n[[prompt.subset]]\nprompt = "a"\n'
        '[[prompt.subset]]\nprompt = "b"\nwidth = 128\nseed = 7\n'
    )
    a, b = load_sample_prompts(toml_file)
    assert (a.width, a.sample_steps, b.width, b.seed) == (256, 12, 128, 7)
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps(["plain --w 128", {"prompt": "dict", "height": 256, "sample_sampler": "ddim"}]))
    plain, from_dict = load_sample_prompts(json_file)
    assert plain.width == 128 and from_dict.height == 256 and from_dict.sampler == "ddim"


def test_samplers():
    assert type(make_sampler("k_euler_a", False)).__name__ == "EulerAncestralDiscreteScheduler"
    assert make_sampler("ddim", True).config.prediction_type == "v_prediction"
    assert make_sampler("dpmsolver++", False).config.algorithm_type == "dpmsolver++"
    with pytest.raises(ConfigError, match="--sample_sampler 'foo'"):
        make_sampler("foo", False)


def test_file_names():
    assert re.fullmatch(r"mylora_e000003_01_\d{14}_42\.png", sample_file_name("mylora", 1, 42, epoch=3))
    assert re.fullmatch(r"000500_00_\d{14}\.png", sample_file_name(None, 0, None, step=500))


def test_generate_samples_writes_images_and_keeps_rng(tiny_sd, tmp_path):
    model = load_stable_diffusion(tiny_sd.sd1_dir)
    components = {
        "vae": model.vae,
        "text_encoder": model.text_encoder,
        "tokenizer": model.tokenizer,
        "unet": model.unet,
    }

    def encode(prompts):
        ids = model.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return model.text_encoder(ids).last_hidden_state

    state = torch.get_rng_state()
    prompts = [
        SamplePrompt("sks toy", width=64, height=64, sample_steps=2, seed=3),
        SamplePrompt("x", width=64, height=64, sample_steps=2, seed=3),
    ]
    paths = generate_samples(
        components,
        prompts,
        encode,
        default_sampler="euler_a",
        v_parameterization=False,
        out_dir=tmp_path,
        output_name="t",
        epoch=1,
        step=0,
        device=torch.device("cpu"),
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    from PIL import Image

    first, second = (Image.open(p) for p in paths)
    assert first.size == (64, 64)
    assert first.tobytes() != second.tobytes()  # the prompt changes the image
