"""Mask images from conditioning_data_dir (--masked_loss): pairing, alignment with the image, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.dataset_config import build_blueprints
from library.data.dataset_group import BatchKey, build_dataset_group
from library.errors import ConfigError, DatasetError
from tests.library.dataset_helpers import PoolingVAE, dataset_args

MASK_CONFIG = """
[general]
resolution = 64
caption_extension = '.txt'
flip_aug = {flip}
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{images}'
  conditioning_data_dir = '{masks}'
"""


def write_masks(image_dir: Path, mask_dir: Path) -> dict[str, np.ndarray]:
    """A mask per image with a distinct red ramp (green and blue are noise the mask must ignore)."""
    mask_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    reds = {}
    for index, image in enumerate(sorted(image_dir.glob("*.png"))):
        width, height = Image.open(image).size
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        yy, xx = np.mgrid[0:height, 0:width]
        rgb[..., 0] = (xx * 2 + yy + index * 17) % 256
        Image.fromarray(rgb).save(mask_dir / f"{image.stem}.png")
        reds[image.stem] = rgb[..., 0]
    return reds


def mask_group(tmp_path, data, tokenizer, flip=False, **flags):
    config = tmp_path / "dataset.toml"
    text = MASK_CONFIG.format(flip=str(flip).lower(), images=data.subject, masks=tmp_path / "masks")
    config.write_text(text)
    args = dataset_args(dataset_config=str(config), masked_loss=True, **flags)
    return build_dataset_group(build_blueprints(args), tokenizer, seed=0)


def center_crop_64(array: np.ndarray) -> np.ndarray:
    """The tiny images are 64x64, 128x64 or 64x128: at resolution 64 they are cropped to the centre."""
    height, width = array.shape[:2]
    top, left = (height - 64) // 2, (width - 64) // 2
    return array[top : top + 64, left : left + 64]


def image_pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1


@pytest.mark.parametrize("flip", [False, True])
def test_mask_is_the_red_channel_cropped_and_flipped_with_its_image(tmp_path, data, tokenizer, flip):
    reds = write_masks(data.subject, tmp_path / "masks")
    group = mask_group(tmp_path, data, tokenizer, flip=flip)
    flipped_seen = set()
    for epoch in (1, 2):
        for index in range(len(group)):
            batch = group[BatchKey(epoch, index)]
            key = batch["image_keys"][0]
            image = batch["images"][0].permute(1, 2, 0).numpy()
            expected_image = center_crop_64(image_pixels(key))
            expected_mask = center_crop_64(reds[Path(key).stem]).astype(np.float32) / 255
            is_flipped = not np.allclose(image, expected_image, atol=1e-6)
            if is_flipped:
                expected_image, expected_mask = expected_image[:, ::-1], expected_mask[:, ::-1]
                flipped_seen.add(key)
            np.testing.assert_allclose(image, expected_image, atol=1e-6)
            assert batch["conditioning_masks"].shape == (1, 64, 64)
            np.testing.assert_array_equal(batch["conditioning_masks"][0].numpy(), expected_mask)
            assert "alpha_masks" not in batch
    assert bool(flipped_seen) == flip


def test_masks_come_with_cached_latents(tmp_path, data, tokenizer):
    reds = write_masks(data.subject, tmp_path / "masks")
    group = mask_group(tmp_path, data, tokenizer, cache_latents=True)
    group.cache_latents(PoolingVAE())
    batch = group[BatchKey(1, 0)]
    assert batch["latents"].shape == (1, 4, 8, 8)
    expected = center_crop_64(reds[Path(batch["image_keys"][0]).stem]).astype(np.float32) / 255
    assert torch.equal(batch["conditioning_masks"][0], torch.from_numpy(expected))


def test_missing_spare_and_mis_sized_masks_are_errors(tmp_path, data, tokenizer):
    masks = tmp_path / "masks"
    write_masks(data.subject, masks)
    (masks / "toy_01.png").unlink()
    with pytest.raises(DatasetError, match=r"datasets\[0\]\.subsets\[0\].*no mask image .* for toy_01\.png"):
        mask_group(tmp_path, data, tokenizer)
    Image.new("RGB", (64, 64)).save(masks / "toy_01.png")
    Image.new("RGB", (64, 64)).save(masks / "stray.png")
    with pytest.raises(DatasetError, match=r"mask images in .* without a training image: stray"):
        mask_group(tmp_path, data, tokenizer)
    (masks / "stray.png").unlink()
    Image.new("RGB", (32, 32)).save(masks / "toy_01.png")
    group = mask_group(tmp_path, data, tokenizer)
    with pytest.raises(DatasetError, match=r"toy_01\.png is 32x32, but its training image toy_01\.png is 64x64"):
        for index in range(len(group)):
            group[BatchKey(1, index)]


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "dataset.toml"
    path.write_text(text)
    return str(path)


def test_mask_subsets_need_masked_loss(tmp_path, data):
    config = write_config(tmp_path, MASK_CONFIG.format(flip="false", images=data.subject, masks=tmp_path))
    with pytest.raises(ConfigError, match=r"conditioning_data_dir \(loss mask images\) .* needs --masked_loss"):
        build_blueprints(dataset_args(dataset_config=config))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "  [[datasets.subsets]]\n  image_dir = '{images}'\n",
            r"mixes subsets with and without conditioning_data_dir",
        ),
        ("  random_crop = true\n", r"random_crop would crop the image but not its conditioning_data_dir mask"),
        ("  is_reg = true\n", r"'is_reg' is not allowed here"),
    ],
)
def test_mask_dataset_errors(tmp_path, data, extra, message):
    text = MASK_CONFIG.format(flip="false", images=data.subject, masks=tmp_path) + extra.format(images=data.reg)
    config = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        build_blueprints(dataset_args(dataset_config=config, masked_loss=True))


def test_masked_loss_without_any_mask_is_an_error(data):
    args = dataset_args(train_data_dir=str(data.train_data_dir), resolution="64", masked_loss=True)
    with pytest.raises(ConfigError, match=r"--masked_loss: no subset has masks"):
        build_blueprints(args)
    build_blueprints(dataset_args(train_data_dir=str(data.train_data_dir), resolution="64", masked_loss=True,
                                  alpha_mask=True))  # fmt: skip
