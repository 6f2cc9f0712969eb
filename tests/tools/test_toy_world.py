"""tools/make_toy_world.py and tools/pretrain_toy_world.py at a tiny budget."""

import json

import pytest
import torch

from library.errors import ConfigError
from library.fileio import read_state_dict
from library.models.stable_diffusion import load_stable_diffusion
from tools import make_toy_world, pretrain_toy_world


def test_write_a_dataset_and_a_loadable_model(tmp_path):
    make_toy_world.main(["--out", str(tmp_path / "data"), "--per_combination", "1"])
    assert len(list((tmp_path / "data" / "img" / "1_toy").glob("*.png"))) == 60
    assert len(list((tmp_path / "data" / "held_out" / "1_toy").glob("*.txt"))) == 12
    with pytest.raises(ConfigError, match="--out .* exists"):
        make_toy_world.main(["--out", str(tmp_path / "data")])
    out = tmp_path / "model"
    flags = ["--vae_steps", "1", "--vae_batch", "2", "--unet_steps", "1", "--unet_batch", "2"]
    flags += ["--images_per_combination", "1", "--eval_images", "4", "--eval_samples", "0", "--threads", "1"]
    pretrain_toy_world.main(["--out", str(out), *flags])
    report = json.loads((out / "pretrain_report.json").read_text())
    assert report["vae"]["steps"] == 1 and report["unet"]["steps"] == 1 and "psnr_db" in report["reconstruction"]
    model = load_stable_diffusion(out / "toy_sd1.safetensors", tokenizer_cache_dir=out / "tokenizers")
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size
    assert next(model.unet.parameters()).dtype == torch.float32


def test_fp16_files_halve_the_size_and_keep_the_weights_to_rounding(tmp_path):
    flags = ["--vae_steps", "1", "--vae_batch", "2", "--unet_steps", "0", "--eval_images", "0", "--threads", "1"]
    pretrain_toy_world.main(["--out", str(tmp_path / "f32"), *flags])
    pretrain_toy_world.main(["--out", str(tmp_path / "f16"), *flags, "--save_precision", "fp16"])
    full, half = (read_state_dict(tmp_path / name / "toy_sd1.safetensors") for name in ("f32", "f16"))
    assert full.keys() == half.keys()
    for key, value in full.items():
        assert half[key].dtype == torch.float16
        torch.testing.assert_close(half[key].float(), value, rtol=1e-3, atol=1e-4)
    sizes = [(tmp_path / name / "toy_sd1.safetensors").stat().st_size for name in ("f32", "f16")]
    assert sizes[1] < 0.51 * sizes[0]


def test_bad_vae_channels_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="--vae_channels '48,64,64,64'"):
        pretrain_toy_world.main(["--out", str(tmp_path / "m"), "--vae_channels", "48,64,64,64"])
    assert not (tmp_path / "m").exists()


def test_a_concept_set_in_kohyas_dreambooth_folders(tmp_path):
    from library.data.dataset_config import build_blueprints
    from library.toy_world.classifier import classify
    from library.toy_world.generator import combination_split
    from tests.library.dataset_helpers import dataset_args

    out = tmp_path / "data"
    make_toy_world.main(["--out", str(out), "--per_combination", "1", "--concept", "purple triangle"])
    instance = out / "concept" / "img" / "20_sks triangle"
    reg = out / "concept" / "reg" / "1_triangle"
    assert {p.read_text() for p in instance.glob("*.txt")} == {"a sks triangle\n"}
    assert len(list(instance.glob("*.png"))) == 6
    known = {c for c, s in combination_split(0)[0] if s == "triangle"}
    assert "purple" not in known and len(known) == 10
    from PIL import Image

    for png in instance.glob("*.png"):
        reading = classify(Image.open(png))
        assert (reading.colour, reading.shape) == ("purple", "triangle")
    for png in reg.glob("*.png"):
        reading = classify(Image.open(png))
        assert reading.shape == "triangle" and reading.colour in known
        assert png.with_suffix(".txt").read_text() == f"a {reading.colour} triangle\n"
    assert len(list(reg.glob("*.png"))) == 4 * len(known)
    # kohya's folder rules read them as they are: 20 repeats of the instance subset, one class subset
    blueprints = build_blueprints(
        dataset_args(
            train_data_dir=str(instance.parent), reg_data_dir=str(reg.parent), caption_extension=".txt", resolution=64
        )
    )
    subsets = blueprints[0].subsets
    assert sorted((s.num_repeats, s.is_reg, s.class_tokens) for s in subsets) == [
        (1, True, "triangle"),
        (20, False, "sks triangle"),
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--concept", "purple"], "give a colour and a shape"),
        (["--concept", "mauve triangle"], "'mauve' is not a toy colour"),
        (["--concept", "red circle"], "is a pretraining combination"),
        (["--concept", "purple triangle", "--concept_token", "red"], "is a toy word"),
        (["--concept", "purple triangle", "--concept_images", "0"], "--concept_images must be 1 or more"),
    ],
)
def test_bad_concepts_are_refused_before_anything_is_written(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        make_toy_world.main(["--out", str(tmp_path / "d"), *flags])
    assert not (tmp_path / "d").exists()


def test_a_second_vae_stage_continues_the_first(tmp_path):
    from diffusers import AutoencoderKL

    flags = ["--vae_batch", "2", "--unet_steps", "0", "--eval_images", "0", "--threads", "1"]
    pretrain_toy_world.main(["--out", str(tmp_path / "first"), "--vae_steps", "2", *flags])
    pretrain_toy_world.main(
        ["--out", str(tmp_path / "second"), "--vae_steps", "1", "--vae_continue_from", str(tmp_path / "first" / "vae")]
        + flags
    )
    first = AutoencoderKL.from_pretrained(tmp_path / "first" / "vae")
    second = AutoencoderKL.from_pretrained(tmp_path / "second" / "vae")
    report = json.loads((tmp_path / "second" / "pretrain_report.json").read_text())
    assert report["vae_continued_from"] == str(tmp_path / "first" / "vae") and report["vae"]["steps"] == 1
    log_variance = slice(first.config.latent_channels, None)
    # one more step moves the weights a little; the initial log-variance shift (-6) is not applied again
    shift = (second.quant_conv.bias[log_variance] - first.quant_conv.bias[log_variance]).abs().max()
    assert 0 < shift < 1
    with pytest.raises(ConfigError, match="give one of them"):
        pretrain_toy_world.main(
            ["--out", str(tmp_path / "x"), "--vae_from", str(tmp_path / "first" / "vae")]
            + ["--vae_continue_from", str(tmp_path / "first" / "vae")]
        )
    assert not (tmp_path / "x").exists()


def test_a_second_diffusion_round_continues_the_first(tmp_path):
    from diffusers import UNet2DConditionModel

    flags = ["--vae_steps", "1", "--vae_batch", "2", "--unet_batch", "2", "--images_per_combination", "1"]
    flags += ["--eval_images", "0", "--eval_samples", "0", "--threads", "1"]
    pretrain_toy_world.main(["--out", str(tmp_path / "first"), "--unet_steps", "1", *flags])
    source = tmp_path / "first" / "toy_sd1"
    second = ["--out", str(tmp_path / "second"), "--vae_from", str(tmp_path / "first" / "vae")]
    pretrain_toy_world.main([*second, "--unet_continue_from", str(source), "--unet_steps", "1", *flags])
    report = json.loads((tmp_path / "second" / "pretrain_report.json").read_text())
    assert report["unet_continued_from"] == str(source) and report["unet"]["steps"] == 1
    before = UNet2DConditionModel.from_pretrained(source / "unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(tmp_path / "second" / "toy_sd1" / "unet").state_dict()
    moved = [key for key in before if not torch.equal(before[key], after[key])]
    assert moved and max((after[k] - before[k]).abs().max() for k in moved) < 0.05  # one small step on
    with pytest.raises(ConfigError, match="has no unet/config.json"):
        pretrain_toy_world.main(["--out", str(tmp_path / "x"), "--unet_continue_from", str(tmp_path)])
    assert not (tmp_path / "x").exists()


def test_a_decoder_only_vae_stage_keeps_the_latent_space(tmp_path):
    from diffusers import AutoencoderKL

    flags = ["--vae_batch", "2", "--unet_steps", "0", "--eval_images", "0", "--threads", "1"]
    pretrain_toy_world.main(["--out", str(tmp_path / "first"), "--vae_steps", "1", *flags])
    first_vae = tmp_path / "first" / "vae"
    second = ["--out", str(tmp_path / "second"), "--vae_continue_from", str(first_vae), "--vae_decoder_only"]
    pretrain_toy_world.main([*second, "--vae_steps", "1", *flags])
    before = AutoencoderKL.from_pretrained(first_vae).state_dict()
    after = AutoencoderKL.from_pretrained(tmp_path / "second" / "vae").state_dict()
    moved = {key for key in before if not torch.equal(before[key], after[key])}
    assert moved and all(key.startswith(("decoder.", "post_quant_conv.")) for key in moved)
    report = json.loads((tmp_path / "second" / "pretrain_report.json").read_text())
    assert "latent_rescale" not in report["vae"]  # same encoder, same latent scale
    with pytest.raises(ConfigError, match="--vae_decoder_only trains a VAE further"):
        pretrain_toy_world.main(["--out", str(tmp_path / "x"), "--vae_decoder_only"])
    assert not (tmp_path / "x").exists()


def test_the_ema_of_a_diffusion_round_averages_its_steps(tmp_path):
    """With --ema_decay the written weights are a moving average of the steps' weights: after two
    steps, one fixed mix of the first step's and the second step's weights in every changed tensor."""
    from diffusers import UNet2DConditionModel

    flags = ["--vae_steps", "1", "--vae_batch", "2", "--unet_batch", "2", "--images_per_combination", "1"]
    flags += ["--eval_images", "0", "--eval_samples", "0", "--threads", "1", "--noise_offset", "0.3"]
    pretrain_toy_world.main(["--out", str(tmp_path / "vae"), "--unet_steps", "0", *flags])
    common = [*flags, "--vae_from", str(tmp_path / "vae" / "vae")]
    runs = {"one": ["--unet_steps", "1"], "two": ["--unet_steps", "2"], "ema": ["--unet_steps", "2"]}
    runs["ema"] += ["--ema_decay", "0.999"]
    weights = {}
    for name, extra in runs.items():
        pretrain_toy_world.main(["--out", str(tmp_path / name), *common, *extra])
        unet = UNet2DConditionModel.from_pretrained(tmp_path / name / "toy_sd1" / "unet")
        weights[name] = torch.cat([p.detach().flatten() for p in unet.parameters()]).double()
    # the first steps of a one-step and a two-step round coincide (same draws, full learning rate)
    step1, step2, ema = weights["one"], weights["two"], weights["ema"]
    changed = (step1 - step2).abs() > 1e-4  # well above float32 rounding of the saved weights
    mix = (ema - step2)[changed] / (step1 - step2)[changed]
    assert 0 < float(mix.median()) < 1
    assert torch.allclose(mix, mix.median(), atol=1e-3)
