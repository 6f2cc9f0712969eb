"""--masked_loss and --weighted_captions reach the training step, and sample prompts are weighted.

The rules themselves are checked against references in tests/library (masked_loss, loss_masks,
prompt_weighting); here one-step runs show the trainer applies them: weights of 1 and masks of 1
change nothing (bit for bit), zero masks leave the network untrained, other weights change it.
"""

import re

import numpy as np
import pytest
import torch
from PIL import Image

import train_network
from library.models.prompt_weighting import encode_sample_prompts
from library.models.stable_diffusion import load_stable_diffusion
from library.models.text_encoding import encode_tokens
from library.training import sampling
from library.training.sampling import SamplePrompt
from networks.lora_file import load_lora_file
from tests.test_train_network import base_argv

pytestmark = [pytest.mark.usefixtures("fresh_accelerate_state"), pytest.mark.slow]
ONE_STEP = ("--max_train_steps", "1", "--cache_latents", "--resolution", "128")


def trained(data, name: str) -> dict[str, torch.Tensor]:
    return load_lora_file(data / "out" / f"{name}.safetensors")[0]


def rewrite_captions(folder, pattern: str, replacement: str) -> None:
    for caption in folder.glob("*.txt"):
        caption.write_text(re.sub(pattern, replacement, caption.read_text()))


def test_weighted_captions_weigh_the_text_conditioning(tiny_sd, data):
    subject = data / "img" / "10_sks toy"  # captions "sks toy, <colour>, <shape>, on the table"
    train_network.main(base_argv(tiny_sd, data, *ONE_STEP, "--output_name", "plain"))
    rewrite_captions(subject, r"sks toy, (\w+),", r"sks toy, (\1:1.0),")
    train_network.main(base_argv(tiny_sd, data, *ONE_STEP, "--weighted_captions", "--output_name", "ones"))
    rewrite_captions(subject, r":1\.0\)", ":1.6)")
    train_network.main(base_argv(tiny_sd, data, *ONE_STEP, "--weighted_captions", "--output_name", "weighted"))
    plain, ones, weighted = trained(data, "plain"), trained(data, "ones"), trained(data, "weighted")
    assert all(torch.equal(plain[key], ones[key]) for key in plain)  # the brackets were read, not tokenised
    assert not all(torch.equal(ones[key], weighted[key]) for key in ones)


def write_mask_dataset(data, value: int) -> str:
    masks = data / f"masks_{value}"
    masks.mkdir()
    for image in (data / "img" / "10_sks toy").glob("*.png"):
        width, height = Image.open(image).size
        Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(masks / image.name)
    config = data / f"dataset_{value}.toml"
    config.write_text(
        "[general]\ncaption_extension = '.txt'\n[[datasets]]\n  [[datasets.subsets]]\n"
        f"  image_dir = '{data / 'img' / '10_sks toy'}'\n  num_repeats = 10\n  conditioning_data_dir = '{masks}'\n"
    )
    return str(config)


def test_masked_loss_weights_the_loss_by_the_mask_images(tiny_sd, data):
    train_network.main(base_argv(tiny_sd, data, *ONE_STEP, "--output_name", "plain"))
    for value in (255, 0):
        config = write_mask_dataset(data, value)
        argv = base_argv(tiny_sd, data, *ONE_STEP, "--masked_loss", "--dataset_config", config)
        train_network.main([*argv, "--output_name", f"mask_{value}"])
    plain, white, black = trained(data, "plain"), trained(data, "mask_255"), trained(data, "mask_0")
    assert all(torch.equal(plain[key], white[key]) for key in plain)
    ups = [tensor for key, tensor in black.items() if key.endswith("lora_up.weight")]
    assert ups and all(up.abs().sum() == 0 for up in ups)  # zero loss everywhere: no gradient


def test_sample_prompts_are_encoded_with_kohyas_weighting(tiny_sd, data, monkeypatch):
    captured = {}
    monkeypatch.setattr(sampling, "generate_samples", lambda components, prompts, encode, **kw: captured.update(
        encode=encode) or [])  # fmt: skip
    model = load_stable_diffusion(tiny_sd.sd1_dir)
    args = train_network.setup_parser().parse_args(["--clip_skip", "2", "--output_dir", str(data / "out")])
    sampling.render_samples(args, torch.device("cpu"), model, model.unet, [SamplePrompt("x")], None, 0)
    texts = ["a (red:1.5) ball", "[blue] cube"]
    with torch.no_grad():
        embeds = captured["encode"](texts)
        expected = encode_sample_prompts(
            model.tokenizer, lambda ids: encode_tokens(model.text_encoder, ids[:, None], clip_skip=2), texts
        )
    torch.testing.assert_close(embeds, expected)
