"""Aspect-ratio buckets, exactly as kohya's ``BucketManager`` and ``make_bucket_resolutions`` build them.

Pure functions on sizes, so the bucket a kohya user's image lands in, the size it is resized to
and the crop box written into latent caches are the ones kohya computes. Sizes are ``(width, height)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from library.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

Size = tuple[int, int]

# SD1.x/SD2.x UNets downsample latents (1/8 of the image) three times, so a bucket side must be a
# multiple of 8 * 8 = 64; SDXL's downsample twice: 32. kohya's trainers assert the same.
SD_BUCKET_RESO_STEPS_MULTIPLE = 64
SDXL_BUCKET_RESO_STEPS_MULTIPLE = 32


@dataclass(frozen=True)
class BucketSettings:
    """The effective bucketing of one dataset; ``None`` buckets means one fixed-size bucket."""

    resolution: Size
    enable_bucket: bool
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int | None = None
    bucket_no_upscale: bool = False

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]

    def predefined_resolutions(self) -> list[Size] | None:
        """The bucket list images are matched against; ``None`` with ``bucket_no_upscale``."""
        if not self.enable_bucket:
            return [self.resolution]
        if self.bucket_no_upscale:
            return None
        return make_bucket_resolutions(
            self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps
        )


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: its bucket, the size it is resized to before cropping, the AR error."""

    bucket: Size
    resized_size: Size
    aspect_ratio_error: float


def make_bucket_resolutions(
    max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Size]:
    """kohya's predefined buckets: about ``max_reso``'s area, sides in ``[min_size, max_size]``, sorted."""
    max_area = max_reso[0] * max_reso[1]
    square = int(math.sqrt(max_area) // divisible) * divisible
    resolutions = {(square, square)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
    return sorted(resolutions)


def make_bucket_settings(
    resolution: Size,
    *,
    enable_bucket: bool,
    min_bucket_reso: int,
    max_bucket_reso: int,
    bucket_reso_steps: int,
    bucket_no_upscale: bool,
    where: str,
    reso_step_multiple: int = SD_BUCKET_RESO_STEPS_MULTIPLE,
) -> BucketSettings:
    """Check a dataset's bucket options and round min/max to ``bucket_reso_steps`` as kohya does.

    ``where`` names the dataset in error messages (``datasets[0] in config.toml``, ``command line``).
    """
    if not enable_bucket:
        if resolution[0] % 8 or resolution[1] % 8:
            raise ConfigError(f"{where}: resolution {resolution[0]}x{resolution[1]} must be a multiple of 8 (VAE)")
        return BucketSettings(resolution, enable_bucket=False)
    steps = bucket_reso_steps
    if steps <= 0 or steps % reso_step_multiple:
        model = "SD1.x/SD2.x need" if reso_step_multiple == SD_BUCKET_RESO_STEPS_MULTIPLE else "SDXL needs"
        raise ConfigError(f"{where}: bucket_reso_steps is {steps}; {model} a multiple of {reso_step_multiple}")
    if resolution[0] % steps or resolution[1] % steps:
        raise ConfigError(
            f"{where}: resolution {resolution[0]}x{resolution[1]} must be a multiple of bucket_reso_steps {steps} "
            "when buckets are enabled"
        )
    if min_bucket_reso % steps:
        adjusted = min_bucket_reso - min_bucket_reso % steps
        logger.warning("%s: min_bucket_reso %d rounded down to %d", where, min_bucket_reso, adjusted)
        min_bucket_reso = adjusted
    if max_bucket_reso % steps:
        adjusted = max_bucket_reso + steps - max_bucket_reso % steps
        logger.warning("%s: max_bucket_reso %d rounded up to %d", where, max_bucket_reso, adjusted)
        max_bucket_reso = adjusted
    if min(resolution) < min_bucket_reso:
        raise ConfigError(f"{where}: min_bucket_reso {min_bucket_reso} is larger than the resolution {resolution}")
    if max(resolution) > max_bucket_reso:
        raise ConfigError(f"{where}: max_bucket_reso {max_bucket_reso} is smaller than the resolution {resolution}")
    if bucket_no_upscale:
        logger.info("%s: bucket_no_upscale sizes buckets from the images; min/max_bucket_reso are ignored", where)
    return BucketSettings(resolution, True, min_bucket_reso, max_bucket_reso, steps, bucket_no_upscale)


def select_bucket(image_size: Size, settings: BucketSettings, predefined: list[Size] | None) -> BucketChoice:
    """The bucket for an image of ``image_size`` (kohya's ``BucketManager.select_bucket``).

    ``predefined`` is ``settings.predefined_resolutions()``, passed in so that it is computed once.
    """
    width, height = image_size
    aspect_ratio = width / height
    if predefined is not None:
        bucket = image_size if image_size in predefined else _closest_aspect_ratio(predefined, aspect_ratio)
        # Scale so that the image covers the bucket; the excess is cropped.
        scale = bucket[1] / height if aspect_ratio > bucket[0] / bucket[1] else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    else:
        resized = _no_upscale_size(image_size, settings.max_area, settings.bucket_reso_steps)
        steps = settings.bucket_reso_steps
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
        if 0 in bucket:
            raise DatasetError(f"image of {width}x{height} is smaller than bucket_reso_steps {steps}")
    return BucketChoice(bucket, resized, bucket[0] / bucket[1] - aspect_ratio)


def _closest_aspect_ratio(resolutions: list[Size], aspect_ratio: float) -> Size:
    ratios = np.array([w / h for w, h in resolutions])
    return resolutions[int(np.abs(ratios - aspect_ratio).argmin())]


def _no_upscale_size(image_size: Size, max_area: int, steps: int) -> Size:
    """The image's own size, or, above ``max_area``, a shrunk size with one side on the step grid."""
    width, height = image_size
    if width * height <= max_area:
        return image_size
    aspect_ratio = width / height
    target_width = math.sqrt(max_area * aspect_ratio)
    target_height = max_area / target_width

    def round_to_steps(x: float) -> int:
        x = int(x + 0.5)
        return x - x % steps

    # Put either the width or the height on the grid, whichever keeps the aspect ratio better.
    width_on_grid = round_to_steps(target_width)
    ar_if_width = width_on_grid / round_to_steps(width_on_grid / aspect_ratio)
    height_on_grid = round_to_steps(target_height)
    ar_if_height = round_to_steps(height_on_grid * aspect_ratio) / height_on_grid
    if abs(ar_if_width - aspect_ratio) < abs(ar_if_height - aspect_ratio):
        return width_on_grid, int(width_on_grid / aspect_ratio + 0.5)
    return int(height_on_grid * aspect_ratio + 0.5), height_on_grid


def crop_ltrb(bucket: Size, original_size: Size) -> tuple[float, float, float, float]:
    """kohya's ``crop_ltrb`` for latent caches: the image fitted inside the bucket, centred.

    This is Stability AI's SDXL size-conditioning convention; SD1.x/SD2.x never read it, but the
    value is stored so that our ``.npz`` files equal kohya's.
    """
    bucket_ar = bucket[0] / bucket[1]
    image_ar = original_size[0] / original_size[1]
    if bucket_ar > image_ar:
        fitted_width, fitted_height = bucket[1] * image_ar, bucket[1]
    else:
        fitted_width, fitted_height = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - fitted_width) // 2
    top = (bucket[1] - fitted_height) // 2
    return left, top, left + fitted_width, top + fitted_height


def sdxl_size_conditioning(
    image_size: Size, bucket: Size, *, flipped: bool, bucketed: bool
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """kohya's SDXL ``(original_size_hw, crop_top_left, target_size_hw)`` of one training sample.

    The original size is the image's (without bucketing: the resolution it is cropped to, with no
    crop); the crop is :func:`crop_ltrb`'s fitted-inside-the-bucket rectangle (kohya: "I have no idea
    how to reflect random crop"), mirrored for a flipped sample (left = target width - right, which
    kohya applies to a zero crop too); the target is the bucket.
    """
    if bucketed:
        left, top, right, _ = crop_ltrb(bucket, image_size)
        original = image_size
    else:
        left, top, right, original = 0, 0, 0, bucket
    if flipped:
        left = bucket[0] - right
    return (int(original[1]), int(original[0])), (int(top), int(left)), (int(bucket[1]), int(bucket[0]))


def crop_offset(excess: int, rng: np.random.Generator | None) -> int:
    """Where a crop starts along one axis: centred, or uniformly random when ``rng`` is given."""
    if excess <= 0:
        return 0
    return int(rng.integers(0, excess + 1)) if rng is not None else excess // 2
