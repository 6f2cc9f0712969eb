"""Helpers the network tests share: model copies, perturbed networks, fixed-input outputs, diffusers' loader."""

import copy

import torch
from diffusers import StableDiffusionPipeline

from tests.networks.tolerances import assert_close


def fresh(model):
    """Copies of the tiny text encoder and UNet that a test may patch or merge into."""
    return copy.deepcopy(model.text_encoder), copy.deepcopy(model.unet)


def perturb(network, seed=0):
    """Move every trained weight off its init (lora_up starts at zero, which would make every check trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)  # float32 values: exact in any dtype
    return network


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


def load_with_diffusers(path, text_encoder, unet, pipeline):
    """``StableDiffusionPipeline.load_lora_weights`` on copies of the models: diffusers + PEFT, unmodified."""
    pipe = StableDiffusionPipeline(
        vae=pipeline.vae,
        text_encoder=text_encoder,
        tokenizer=pipeline.tokenizer,
        unet=unet,
        scheduler=pipeline.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)  # raises on keys it cannot map


def assert_lora_consumers_compute_as_we_do(network, models, pipeline, tmp_path):
    """Save ``network`` (built on ``models[0]``, a float64 copy) and check that diffusers' loader and
    ``networks.lora`` (what kohya-protocol consumers use) compute what the network computes applied."""
    from networks import lora

    ours, theirs, as_lora = models
    path = tmp_path / "network.safetensors"
    network.save_weights(path, None, {})
    network.apply_to(*ours)
    network.eval()
    expected = outputs(*ours)
    load_with_diffusers(path, *theirs, pipeline)
    assert_outputs_close(outputs(*theirs), expected)
    plain, weights = lora.create_network_from_weights(1.0, path, None, *as_lora)
    plain.load_weights(weights)
    plain.to(torch.float64).apply_to(*as_lora)
    assert_outputs_close(outputs(*as_lora), expected)
