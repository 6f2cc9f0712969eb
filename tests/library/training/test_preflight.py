"""Checks before the model loads: output folder, numbers, images; and the finite checks of a run."""

import argparse
import io
import logging
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from library.data.dataset_config import build_blueprints
from library.errors import ConfigError, DatasetError
from library.training.args import train_network_parser
from library.training.divergence import TrainingDivergedError, check_finite_weights, loss_is_finite
from library.training.preflight import (
    check_free_space,
    check_images,
    check_numbers,
    check_output_dir,
    save_size_estimate,
)


def test_output_dir_is_created_and_probed(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe is gone


def test_output_dir_that_is_a_file_or_under_one_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match="is not writable"):
        check_output_dir(tmp_path / "file" / "sub")


def test_free_space_is_compared_with_the_estimate(tmp_path):
    with pytest.raises(ConfigError, match="MiB free but a checkpoint needs"):
        check_free_space(tmp_path, 2**62, "a checkpoint")
    check_free_space(tmp_path / "not" / "yet", 1, "a checkpoint")  # tools/compress_ffn.py creates it later
    assert save_size_estimate(1000, 2, save_state=False) < save_size_estimate(1000, 2, save_state=True)


def _args(*extra: str) -> argparse.Namespace:
    return train_network_parser().parse_args(["--output_dir", "out", *extra])


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--learning_rate", "-1"], "--learning_rate -1.0: a learning rate must be"),
        (["--unet_lr", "nan"], "--unet_lr nan"),
        (["--max_train_steps", "0"], "--max_train_steps 0 trains nothing"),
    ],
)
def test_numbers_that_would_crash_or_train_nothing(flags, match):
    with pytest.raises(ConfigError, match=match):
        check_numbers(_args(*flags), needs_steps=True)


def test_zero_steps_is_allowed_when_only_resaving():
    check_numbers(_args("--max_train_steps", "0"), needs_steps=False)


def _png(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 50).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()


def _dataset(tmp_path: Path, images: dict[str, bytes]):
    folder = tmp_path / "img" / "1_sks"
    folder.mkdir(parents=True)
    for name, data in images.items():
        (folder / name).write_bytes(data)
    return build_blueprints(_args("--train_data_dir", str(tmp_path / "img"), "--resolution", "64"))


@pytest.mark.parametrize(
    ("name", "data"),
    [("cut.png", _png()[:-30]), ("cut.jpg", _jpeg()[:-2000]), ("junk.png", b"\x89PNG\r\n\x1a\n" + b"x" * 40)],
    ids=["truncated-png", "truncated-jpeg", "garbage"],
)
def test_an_undecodable_image_fails_before_training(tmp_path, name, data):
    blueprints = _dataset(tmp_path, {"good.png": _png(), name: data})
    with pytest.raises(DatasetError, match=name):
        check_images(blueprints, skip_cached=False)


def test_a_cached_image_is_not_decoded_and_tiny_images_are_warned_once(tmp_path, caplog):
    blueprints = _dataset(tmp_path, {"good.png": _png(), "dot.png": _png((1, 1)), "cut.png": _png()[:-30]})
    (tmp_path / "img" / "1_sks" / "cut_0064x0064_sd.npz").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        check_images(blueprints, skip_cached=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]  # none about captions
    assert len(warnings) == 1 and "dot.png" in warnings[0] and "good.png" not in warnings[0]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_finite_checks():
    accelerator = Accelerator(cpu=True)
    assert loss_is_finite(torch.tensor(0.5), accelerator)
    assert not loss_is_finite(torch.tensor(float("nan")), accelerator)
    check_finite_weights([torch.ones(3)], Path("a.safetensors"), 4, None)
    with pytest.raises(TrainingDivergedError, match="2 non-finite values at step 4; a.safetensors was not written"):
        check_finite_weights([torch.tensor([1.0, float("inf"), float("nan")])], Path("a.safetensors"), 4, None)
