"""Loss masks of a batch: images' alpha channels (``alpha_mask``) and mask images (``conditioning_data_dir``).

kohya weights the loss per pixel with a mask in ``[0, 1]`` (``--masked_loss``). An ``alpha_mask``
subset's mask is the image's alpha channel, kept with cached latents (the ``alpha_mask`` key of
the ``.npz``). A subset with ``conditioning_data_dir`` (with ``--masked_loss``) takes the red
channel of the mask image of the same name, loaded with each batch as kohya does. The mask image
is resized and cropped exactly as its training image, so it stays aligned with it (kohya resizes
it straight to the bucket size, which shifts it by the crop when the aspect ratios differ).
"""

from __future__ import annotations

import numpy as np
import torch

from library.data.image_sources import ImageRecord
from library.data.images import fit_to_bucket, load_image
from library.errors import DatasetError


def conditioning_mask(record: ImageRecord, interpolation: str | None, flipped: bool) -> torch.Tensor:
    """``(H, W)`` float32 in ``[0, 1]``: the red channel of the record's mask image, bucket-sized."""
    image = load_image(record.mask_path)
    if image.shape[1::-1] != tuple(record.size):
        raise DatasetError(
            f"mask image {record.mask_path} is {image.shape[1]}x{image.shape[0]}, but its training image "
            f"{record.path.name} is {record.size[0]}x{record.size[1]}; they must be the same size"
        )
    image = fit_to_bucket(image, record.bucket, record.resized_size, interpolation=interpolation)
    if flipped:
        image = image[:, ::-1]
    return torch.from_numpy(image[..., 0].astype(np.float32) / 255.0)


def collate_loss_masks(samples: list[dict], batch: dict, pixel_key: str) -> None:
    """Put the samples' masks into ``batch``: ``conditioning_masks`` or ``alpha_masks``, ``(B, H, W)``.

    Images without an alpha mask in a batch that has some get all ones, as in kohya.
    """
    if samples[0].get("conditioning_mask") is not None:  # a dataset's subsets all have mask images, or none
        batch["conditioning_masks"] = torch.stack([s["conditioning_mask"] for s in samples])
    masks = [s.get("alpha_mask") for s in samples]
    if any(mask is not None for mask in masks):
        height, width = batch[pixel_key].shape[-2:]
        scale = 8 if pixel_key == "latents" else 1
        ones = torch.ones(height * scale, width * scale)
        batch["alpha_masks"] = torch.stack([ones if mask is None else mask for mask in masks])
