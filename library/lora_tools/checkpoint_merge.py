"""Baking LoRA/LoCon updates into an SD checkpoint's weights: ``W += ratio * alpha / rank * up @ down``.

Each update is formed in float64 and added to the weight in float64, then stored in the weight's
own dtype, so the only rounding is the final one (kohya adds in float32 and saves float32 unless
told otherwise). Every module of every LoRA is matched to a layer before any weight changes: a
module that matches no layer, or a layer of another shape, means the LoRA is for another model.
"""

from __future__ import annotations

import logging

import torch

from library.errors import ConfigError
from library.lora_tools.lora_sets import LoRAInput, LoRAModule
from library.lora_tools.sd_weights import SDWeights

logger = logging.getLogger(__name__)


def _check_fits(module: LoRAModule, weight: torch.Tensor, lora: LoRAInput, weights: SDWeights) -> None:
    out_features, fan_in = weight.shape[0], weight[0].numel()
    kernel_ok = len(module.down_tail) != 3 or weight.dim() != 4 or tuple(weight.shape[1:]) == module.down_tail
    if (module.out_features, module.fan_in) != (out_features, fan_in) or not kernel_ok:
        raise ConfigError(
            f"'{lora.path}': module '{module.name}' is {module.out_features}x{module.down_tail} but the "
            f"{weights.family} layer in '{weights.source}' is {tuple(weight.shape)}: the LoRA is for another model"
        )


def match_layers(weights: SDWeights, inputs: list[LoRAInput]) -> dict[str, tuple[str, str]]:
    """Each LoRA module's (part, key) in ``weights``; one-line :class:`ConfigError` for modules of another model."""
    layers = weights.layers()
    for lora in inputs:
        unmatched = [name for name in lora.modules if name not in layers]
        if unmatched:
            raise ConfigError(
                f"'{lora.path}': {len(unmatched)} of {len(lora.modules)} modules match no layer of the "
                f"{weights.family} model '{weights.source}' (first: {unmatched[0]}): the LoRA is for another model"
            )
        for name, module in lora.modules.items():
            _check_fits(module, weights.tensor(*layers[name]), lora, weights)
    return layers


def bake_loras(weights: SDWeights, inputs: list[LoRAInput], ratios: list[float]) -> int:
    """Add every module's ``ratio``-scaled update to its layer (in place); returns the number of layers changed."""
    layers = match_layers(weights, inputs)
    updates: dict[str, torch.Tensor] = {}
    for lora, ratio in zip(inputs, ratios):
        for name, module in lora.modules.items():
            delta = module.delta(torch.float64) * ratio
            updates[name] = updates[name] + delta if name in updates else delta
    for name, delta in updates.items():
        part, key = layers[name]
        weight = weights.tensor(part, key)
        merged = weight.double() + delta.reshape(weight.shape)
        weights.replace(part, key, merged.to(weight.dtype))
    logger.info("merged %d LoRA modules into '%s'", len(updates), weights.source)
    return len(updates)
