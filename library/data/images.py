"""Reading training images and turning them into bucket-sized tensors (PIL and numpy only).

Images are ``uint8`` arrays ``(H, W, C)`` between these functions, as in kohya, so that
resizing, cropping, colour augmentation and flipping compose in kohya's order.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from library.data.buckets import Size, crop_offset
from library.errors import ConfigError, DatasetError

# kohya's list (train_util.IMAGE_EXTENSIONS); matched case-insensitively.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# kohya's --resize_interpolation names. kohya resizes with OpenCV except for lanczos/box; PIL's
# filters are the same kernels ("area" is OpenCV's pixel-area average, which PIL calls BOX).
INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}

# kohya's colour augmentation (AugHelper.color_aug, a replacement for albumentations'
# HueSaturationValue(8) / RandomGamma(95..105), applied with probability 0.33).
COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT_OPENCV = 8  # OpenCV hue units: 180 per turn
GAMMA_RANGE = (0.95, 1.05)


def check_interpolation(name: str | None, where: str) -> None:
    if name is not None and name not in INTERPOLATIONS:
        raise ConfigError(f"{where}: resize_interpolation '{name}' is not one of {', '.join(INTERPOLATIONS)}")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_image_size(path: Path) -> Size:
    """``(width, height)`` from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error


def load_image(path: str | os.PathLike, with_alpha: bool = False) -> np.ndarray:
    """The decoded image as ``uint8`` RGB, or RGBA when its alpha channel is wanted as a loss mask."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGBA" if with_alpha else "RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error


def resize(image: np.ndarray, size: Size, interpolation: str | None = None) -> np.ndarray:
    """Resize to ``size``; by default area-averaging to shrink and Lanczos to enlarge, as kohya."""
    height, width = image.shape[:2]
    if (width, height) == tuple(size):
        return image
    if interpolation is None:
        interpolation = "area" if width >= size[0] and height >= size[1] else "lanczos"
    return np.asarray(Image.fromarray(image).resize(tuple(size), resample=INTERPOLATIONS[interpolation]))


def fit_to_bucket(
    image: np.ndarray,
    bucket: Size,
    resized_size: Size,
    *,
    random_crop_rng: np.random.Generator | None = None,
    interpolation: str | None = None,
) -> np.ndarray:
    """Resize to ``resized_size`` (which covers ``bucket``) and crop the excess, centred or at random."""
    image = resize(image, resized_size, interpolation)
    height, width = image.shape[:2]
    left = crop_offset(width - bucket[0], random_crop_rng)
    top = crop_offset(height - bucket[1], random_crop_rng)
    return image[top : top + bucket[1], left : left + bucket[0]]


def face_box_from_name(path: Path) -> tuple[int, int, int, int] | None:
    """kohya's face-crop file names ``<name>_<cx>_<cy>_<w>_<h>.<ext>`` carry the face box."""
    tokens = path.stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        return tuple(int(t) for t in tokens[-4:])
    except ValueError:
        return None


def crop_around_face(
    image: np.ndarray,
    face_box: tuple[int, int, int, int],
    resolution: Size,
    face_crop_aug_range: tuple[float, float],
    *,
    random_crop: bool,
    rng: np.random.Generator,
    interpolation: str | None = None,
) -> np.ndarray:
    """kohya's ``--face_crop_aug_range``: scale so the face spans a random share of the crop, crop around it."""
    height, width = image.shape[:2]
    target_w, target_h = resolution
    if (width, height) == (target_w, target_h):
        return image
    face_cx, face_cy, face_w, face_h = face_box
    face_size = max(face_w, face_h)
    short_side = min(target_w, target_h)
    cover_scale = max(target_h / height, target_w / width)
    min_scale = min(1.0, max(cover_scale, short_side / (face_size * face_crop_aug_range[1])))
    max_scale = min(1.0, max(min_scale, short_side / (face_size * face_crop_aug_range[0])))
    scale = min_scale if min_scale >= max_scale else float(rng.uniform(min_scale, max_scale))
    # kohya never enlarges here and fails on small images; enlarging just enough to cover is the fix.
    scale = max(scale, cover_scale)
    new_w, new_h = int(width * scale + 0.5), int(height * scale + 0.5)
    image = resize(image, (new_w, new_h), interpolation)
    centre = (int(face_cy * scale + 0.5), int(face_cx * scale + 0.5))
    ranged = face_crop_aug_range[0] != face_crop_aug_range[1]
    jitter_faces = ranged and face_size > short_side // 10 and face_size >= 40
    starts = []
    for target, length, face_pos in zip((target_h, target_w), (new_h, new_w), centre):
        start = face_pos - target // 2
        if random_crop:
            # Off-centre with a triangular distribution, so that some background is learned too.
            spread = max(length - face_pos, face_pos)
            start += int(rng.integers(0, spread + 1)) + int(rng.integers(0, spread + 1)) - spread
        elif jitter_faces:
            start += int(rng.integers(-face_size // 20, face_size // 20 + 1))
        starts.append(max(0, min(start, length - target)))
    top, left = starts
    return image[top : top + target_h, left : left + target_w]


def color_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """kohya's weak colour jitter on RGB: sometimes a small hue shift, sometimes a small gamma.

    kohya raises raw 0..255 values to the power gamma (255**1.05 clips to white, 255**0.95 darkens
    to 193); we apply gamma to values normalised to 0..1, the RandomGamma kohya meant to replace.
    """
    if rng.random() > COLOR_AUG_PROBABILITY:
        return image
    if rng.random() > 0.5:
        shift = rng.uniform(-HUE_SHIFT_LIMIT_OPENCV, HUE_SHIFT_LIMIT_OPENCV) * 256 / 180  # to PIL's 256 per turn
        hsv = np.asarray(Image.fromarray(image).convert("HSV")).copy()
        hsv[..., 0] = np.round(hsv[..., 0].astype(np.float64) + shift).astype(np.int64) % 256
        channels = [Image.fromarray(np.ascontiguousarray(hsv[..., i])) for i in range(3)]
        return np.asarray(Image.merge("HSV", channels).convert("RGB"))
    gamma = rng.uniform(*GAMMA_RANGE)
    return np.clip(np.round(255.0 * (image / 255.0) ** gamma), 0, 255).astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(3, H, W)`` float32 in ``[-1, 1]`` (kohya's ToTensor + Normalize(0.5, 0.5))."""
    return torch.from_numpy(np.array(image[..., :3], dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def alpha_mask(image: np.ndarray) -> torch.Tensor:
    """``(H, W)`` float32 in ``[0, 1]`` from the alpha channel; all ones for an image without one."""
    if image.shape[2] == 4:
        return torch.from_numpy(image[..., 3].astype(np.float32) / 255.0)
    return torch.ones(image.shape[:2], dtype=torch.float32)
