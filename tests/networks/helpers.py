"""Fixed-input outputs of a tiny text encoder and UNet, shared by the network tests."""

import torch

from tests.networks.tolerances import assert_close


def outputs(text_encoder, unet, seed=0):
    """Text-encoder and UNet outputs on fixed inputs; the UNet gets its own context, so each part is checked alone."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 77), generator=generator)
    latents, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 64, generator=generator)
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        return hidden, unet(latents.to(unet.dtype), torch.tensor([10, 500]), context.to(unet.dtype)).sample


def assert_outputs_close(actual, expected):
    for a, e in zip(actual, expected):
        assert_close(a, e)
