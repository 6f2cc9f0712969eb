"""Image reading, resizing, cropping and augmentations."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.images import (
    alpha_mask,
    check_interpolation,
    color_augment,
    crop_around_face,
    face_box_from_name,
    fit_to_bucket,
    list_images,
    load_image,
    read_image_size,
    resize,
    to_tensor,
)
from library.errors import ConfigError, DatasetError


def gradient(width, height):
    """An RGB image whose red channel is the column index and green the row index."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = np.arange(width)[None, :]
    image[..., 1] = np.arange(height)[:, None]
    return image


def test_list_images_is_flat_sorted_and_case_insensitive(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.webp", "notes.txt", "d.Jpeg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.png").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp", "d.Jpeg"]


def test_sizes_come_from_the_header_and_bad_files_are_named(tmp_path):
    Image.fromarray(gradient(40, 24)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    assert read_image_size(tmp_path / "ok.png") == (40, 24)
    with pytest.raises(DatasetError, match=r"cannot read image .*bad.png"):
        read_image_size(tmp_path / "bad.png")
    with pytest.raises(DatasetError, match=r"cannot read image .*missing.png"):
        load_image(tmp_path / "missing.png")


def test_load_image_converts_to_rgb_or_rgba(tmp_path):
    Image.fromarray(gradient(8, 8)[..., 0]).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").shape == (8, 8, 3)
    rgba = load_image(tmp_path / "gray.png", with_alpha=True)
    assert rgba.shape == (8, 8, 4) and (rgba[..., 3] == 255).all()


def test_default_interpolation_is_area_down_and_lanczos_up():
    image = gradient(64, 64)
    down = resize(image, (32, 32))
    # area averaging of a column ramp: pixel x covers columns 2x and 2x+1 -> mean 2x + 0.5, rounded up
    assert np.array_equal(down[0, :, 0], np.arange(32) * 2 + 1)
    lanczos = np.asarray(Image.fromarray(image).resize((96, 96), Image.Resampling.LANCZOS))
    assert np.array_equal(resize(image, (96, 96)), lanczos)
    nearest = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.NEAREST))
    assert np.array_equal(resize(image, (32, 32), "nearest"), nearest)


def test_unknown_interpolation_is_a_config_error():
    check_interpolation("lanczos", "test")
    with pytest.raises(ConfigError, match="resize_interpolation 'sinc' is not one of lanczos"):
        check_interpolation("sinc", "datasets[0]")


def test_fit_to_bucket_crops_the_centre_or_a_random_window():
    image = gradient(100, 64)
    centred = fit_to_bucket(image, (64, 64), (100, 64))
    assert np.array_equal(centred, image[:, 18:82])
    starts = {
        int(fit_to_bucket(image, (64, 64), (100, 64), random_crop_rng=np.random.default_rng(s))[0, 0, 0])
        for s in range(60)
    }
    assert starts <= set(range(37)) and len(starts) > 10


def test_face_crop_centres_the_face_and_scales_within_the_range():
    assert face_box_from_name(Path("me_60_40_20_20.png")) == (60, 40, 20, 20)
    assert face_box_from_name(Path("me_a_b_c_d.png")) is None
    image = gradient(200, 120)
    # face 20px wide at (60, 40); range (2, 2): the face spans half of the 64px short side -> scale 1.6,
    # but kohya never enlarges past 1.0, so the crop is 64x64 around the face at scale 1.
    crop = crop_around_face(image, (60, 40, 20, 20), (64, 64), (2.0, 2.0), random_crop=False, rng=None)
    assert crop.shape == (64, 64, 3)
    assert (crop[0, 0, 0], crop[0, 0, 1]) == (60 - 32, 40 - 32)
    # a 100px face with range (1, 1) wants a 0.64 scale: 200x120 -> 128x77, face at (38, 26)
    crop = crop_around_face(image, (60, 40, 100, 100), (64, 64), (1.0, 1.0), random_crop=False, rng=None)
    assert crop.shape == (64, 64, 3)


def test_color_augment_is_rare_and_small():
    image = np.random.default_rng(0).integers(30, 220, size=(16, 16, 3), dtype=np.uint8)
    changed, max_change = 0, 0
    for seed in range(100):
        out = color_augment(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        diff = np.abs(out.astype(int) - image).max()
        changed += diff > 0
        if diff:
            # gamma 0.95..1.05 of normalised values, or a hue turn of at most 16 degrees
            mean_change = np.abs(out.astype(int) - image).mean()
            max_change = max(max_change, mean_change)
    assert 20 <= changed <= 48  # kohya applies it with probability 0.33
    assert max_change < 20


def test_gamma_is_applied_to_normalised_values():
    # greys have no hue, so only the gamma branch changes them; kohya's raw 255 ** 0.95 would give 193
    greys = np.array([[[0, 0, 0], [128, 128, 128], [255, 255, 255]]], dtype=np.uint8)
    outputs = [color_augment(greys, np.random.default_rng(seed)) for seed in range(200)]
    assert all((out[0, 0] == 0).all() and (out[0, 2] == 255).all() for out in outputs)
    mids = {int(out[0, 1, 0]) for out in outputs}
    assert len(mids) > 2 and min(mids) >= 123 and max(mids) <= 133  # 255 * (128/255) ** 1.05 .. ** 0.95


def test_tensors_are_minus_one_to_one_and_alpha_is_a_mask():
    image = np.array([[[0, 255, 51, 102]]], dtype=np.uint8)
    assert torch.allclose(to_tensor(image)[:, 0, 0], torch.tensor([-1.0, 1.0, -0.6]))
    assert torch.allclose(alpha_mask(image), torch.tensor([[0.4]]))
    assert torch.equal(alpha_mask(image[..., :3]), torch.ones(1, 1))
