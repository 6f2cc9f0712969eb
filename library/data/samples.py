"""One training sample of an image record, in kohya's order of operations.

Either the cached latents (in memory or in the record's ``.npz``), or the image loaded, cropped to
its bucket (or around a face, or a random window), colour-augmented and flipped. The dataset group
decides which, and draws the randomness; these functions only apply it.
"""

from __future__ import annotations

import numpy as np
import torch

from library.data.bucketed_dataset import BucketedDataset
from library.data.dataset_config import SubsetBlueprint
from library.data.image_sources import ImageRecord, load_record_image
from library.data.images import (
    alpha_mask,
    color_augment,
    crop_around_face,
    face_box_from_name,
    fit_to_bucket,
    to_tensor,
)
from library.data.latent_cache import load_npz
from library.errors import DatasetError


def cached_sample(record: ImageRecord, flipped: bool) -> dict:
    if record.latents is not None:
        latents = record.latents_flipped if flipped else record.latents
        mask = record.cached_alpha_mask
    else:
        cached = load_npz(record.npz_path)
        array = cached.latents_flipped if flipped else cached.latents
        if array is None:
            raise DatasetError(f"{record.npz_path} has no latents_flipped; delete it to rebuild it for flip_aug")
        latents = torch.from_numpy(array)
        mask = torch.from_numpy(cached.alpha_mask) if cached.alpha_mask is not None else None
    if mask is not None and flipped:
        mask = torch.flip(mask, dims=[1])
    return {"latents": latents, "alpha_mask": mask}


def image_sample(
    dataset: BucketedDataset, record: ImageRecord, subset: SubsetBlueprint, flipped: bool, rng: np.random.Generator
) -> dict:
    """Load, crop to the bucket, colour-augment, flip: kohya's order."""
    image = crop_to_bucket(dataset, record, subset, load_record_image(record, with_alpha=subset.alpha_mask), rng)
    if subset.color_aug:
        image = image.copy()
        image[..., :3] = color_augment(np.ascontiguousarray(image[..., :3]), rng)
    if flipped:
        image = image[:, ::-1]
    return {"images": to_tensor(image), "alpha_mask": alpha_mask(image) if subset.alpha_mask else None}


def crop_to_bucket(
    dataset: BucketedDataset, record: ImageRecord, subset: SubsetBlueprint, image: np.ndarray, rng
) -> np.ndarray:
    settings = dataset.blueprint.buckets
    interpolation = subset.resize_interpolation or dataset.blueprint.resize_interpolation
    if not settings.enable_bucket:
        face = face_box_from_name(record.path) if subset.face_crop_aug_range else None
        if face is not None and face[0] > 0:
            return crop_around_face(
                image,
                face,
                settings.resolution,
                subset.face_crop_aug_range,
                random_crop=subset.random_crop,
                rng=rng,
                interpolation=interpolation,
            )
        width, height = settings.resolution
        if subset.random_crop and image.shape[0] >= height and image.shape[1] >= width:
            # kohya's style-training crop: a random window of the unscaled image
            top = int(rng.integers(0, image.shape[0] - height + 1))
            left = int(rng.integers(0, image.shape[1] - width + 1))
            return image[top : top + height, left : left + width]
    random_crop_rng = rng if subset.random_crop else None
    return fit_to_bucket(
        image, record.bucket, record.resized_size, random_crop_rng=random_crop_rng, interpolation=interpolation
    )
