"""UNet variants that feature packages add to the loader, so that core never imports a feature.

A variant is a diffusers UNet folder whose ``config.json`` carries a key of its own (e.g. the
narrowed feed-forwards of ``library.ffn_compression``). The feature registers how to load such a
folder and why it cannot be written as a single LDM file; ``load_stable_diffusion`` and
``ldm_state_dict`` consult this registry and otherwise use stock diffusers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel


@dataclass(frozen=True)
class UNetVariant:
    """A UNet config key a feature owns, its folder loader, and why no LDM single file can hold it."""

    config_key: str
    load_folder: Callable[[str | os.PathLike, torch.dtype | None], UNet2DConditionModel]
    single_file_refusal: str

    def matches(self, config: Mapping) -> bool:
        return bool(config.get(self.config_key))


_VARIANTS: dict[str, UNetVariant] = {}


def register_unet_variant(variant: UNetVariant) -> None:
    """Called by a feature package when it is imported (see ``library.features``)."""
    _VARIANTS[variant.config_key] = variant


def variant_of(config: Mapping) -> UNetVariant | None:
    """The registered variant a UNet config belongs to, or None for a stock UNet."""
    return next((variant for variant in _VARIANTS.values() if variant.matches(config)), None)
