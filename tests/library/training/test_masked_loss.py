"""kohya's masked loss against a block-average reference."""

import torch

from library.models.families import make_training_scheduler
from library.training.masked_loss import apply_loss_mask, loss_mask
from library.training.noise import NoiseOptions, per_sample_loss


def block_average(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Area resizing by an integer factor, written as the mean of each factor x factor block."""
    batch, height, width = mask.shape
    return mask.reshape(batch, height // factor, factor, width // factor, factor).mean(dim=(2, 4))


def test_mask_is_averaged_over_each_latent_pixel():
    loss = torch.rand(2, 4, 8, 8)
    mask = torch.rand(2, 64, 64)
    torch.testing.assert_close(apply_loss_mask(loss, mask), loss * block_average(mask, 8)[:, None])


def test_mask_images_win_over_alpha_masks():
    alpha, images = torch.rand(1, 8, 8), torch.rand(1, 8, 8)
    assert loss_mask({"alpha_masks": alpha}) is alpha
    assert loss_mask({"alpha_masks": alpha, "conditioning_masks": images}) is images
    assert loss_mask({"latents": torch.zeros(1)}) is None


def test_masked_out_pixels_count_as_zero_loss():
    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 64, 64)
    mask[:, :, :32] = 1.0  # the left half of every image
    timesteps = torch.tensor([10, 500])
    loss = per_sample_loss(prediction, target, timesteps, make_training_scheduler(False), NoiseOptions(), mask=mask)
    squared = (prediction - target) ** 2
    expected = squared[..., :4].sum(dim=(1, 2, 3)) / squared[0].numel()  # kohya divides by every pixel
    torch.testing.assert_close(loss, expected)
