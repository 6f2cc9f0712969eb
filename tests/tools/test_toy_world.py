"""tools/make_toy_world.py and tools/pretrain_toy_world.py at a tiny budget."""

import json

import pytest

from library.errors import ConfigError
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


def test_bad_vae_channels_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="--vae_channels '48,64,64,64'"):
        pretrain_toy_world.main(["--out", str(tmp_path / "m"), "--vae_channels", "48,64,64,64"])
    assert not (tmp_path / "m").exists()
