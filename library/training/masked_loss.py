"""kohya's masked loss (``apply_masked_loss``): the element-wise loss weighted by a per-pixel mask.

The mask of a batch is its mask images' red channel (``conditioning_data_dir`` subsets, with
``--masked_loss``) or else its alpha masks (``alpha_mask`` subsets); it is area-resized from pixel
to latent size and multiplies the loss before the mean over channels and pixels, so masked-out
pixels count as zero loss (the mean still divides by every pixel, as in kohya).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_mask(batch: dict) -> torch.Tensor | None:
    """The batch's mask ``(B, H, W)`` in pixels, in kohya's order of preference, or ``None``."""
    if batch.get("conditioning_masks") is not None:
        return batch["conditioning_masks"]
    return batch.get("alpha_masks")


def apply_loss_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``loss`` ``(B, C, h, w)`` times ``mask`` ``(B, H, W)`` area-resized to ``(h, w)``."""
    resized = F.interpolate(mask[:, None].to(loss), size=loss.shape[2:], mode="area")
    return loss * resized
