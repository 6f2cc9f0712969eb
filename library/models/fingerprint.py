"""A short fingerprint of a model's weights, stored in on-disk caches to tell which model wrote them.

Latent and text-encoder caches live beside the images and outlive a run. kohya reuses them whatever
model is loaded next, so switching to a checkpoint with another VAE or text encoder silently trains
on the old model's latents or conditioning. A cache written here records the fingerprint of the
model that wrote it, and a cache with another fingerprint is encoded again.

The fingerprint hashes every parameter and buffer's name, shape and a strided sample of its values
read as float32: a fraction of a second even for SDXL, the same for a model loaded in float32 or
kept in its file's fp16/bf16 (the values are the same), and different for any fine-tune, which
moves every weight.
"""

from __future__ import annotations

import hashlib

import torch

SAMPLES_PER_TENSOR = 1024


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """16 hex digits identifying the weights of ``modules`` (in order)."""
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        tensors = dict(module.named_parameters())
        tensors.update(module.named_buffers())
        for name in sorted(tensors):
            values = tensors[name].detach().reshape(-1)
            stride = max(1, values.numel() // SAMPLES_PER_TENSOR)
            sample = values[::stride].to("cpu", torch.float32).contiguous()
            digest.update(f"{index}:{name}:{tuple(tensors[name].shape)}:".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
