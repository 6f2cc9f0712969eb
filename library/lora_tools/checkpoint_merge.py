"""Baking LoRA/LoCon updates into an SD checkpoint's weights: ``W += ratio * alpha / rank * up @ down``.

Each update is formed in float64 and added to the weight in float64, then rounded once to the
output dtype (``--save_precision``, else the weight's own), so the only rounding is the final one:
an fp16 checkpoint saved as float keeps the float32 sum, not an fp16 one cast up (kohya adds in
float32 and saves float32 unless told otherwise). Layers are baked one at a time and in blocks of
rows, so the float64 work stays in small reused buffers (whole float64 updates of an SD1.5 LoCon
would take ~6 GB, and fresh large buffers cost more in page faults than the arithmetic). Every
module of every LoRA is matched to a layer before any weight changes: a module that matches no
layer, or a layer of another shape, means the LoRA is for another model.
"""

from __future__ import annotations

import logging

import torch

from library.errors import ConfigError
from library.lora_tools.lora_sets import LoRAInput, LoRAModule
from library.lora_tools.sd_weights import SDWeights

logger = logging.getLogger(__name__)
BLOCK_ELEMENTS = 1 << 18  # float64 rows per block: 2 MiB, reused by the allocator


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


def bake_loras(
    weights: SDWeights, inputs: list[LoRAInput], ratios: list[float], dtype: torch.dtype | None = None
) -> int:
    """Add every module's ``ratio``-scaled update to its layer (in place), rounded once to ``dtype``
    (``None``: the layer's dtype); returns the number of layers changed."""
    layers = match_layers(weights, inputs)
    names = list(dict.fromkeys(name for lora in inputs for name in lora.modules))
    for name in names:
        part, key = layers[name]
        weight = weights.tensor(part, key)
        parts = [
            (lora.modules[name].up.double(), lora.modules[name].down.double(), lora.modules[name].scale, ratio)
            for lora, ratio in zip(inputs, ratios)
            if name in lora.modules
        ]
        matrix = weight.reshape(weight.shape[0], -1)
        baked = torch.empty(matrix.shape, dtype=dtype or weight.dtype)
        rows = max(1, BLOCK_ELEMENTS // matrix.shape[1])
        for start in range(0, matrix.shape[0], rows):
            block = matrix[start : start + rows].to(torch.float64, copy=True)
            for up, down, scale, ratio in parts:  # the order of LoRAModule.delta(), then the ratio
                block += (up[start : start + rows] @ down) * scale * ratio
            baked[start : start + rows] = block
        weights.replace(part, key, baked.reshape(weight.shape))
    logger.info("merged %d LoRA modules into '%s'", len(names), weights.source)
    return len(names)
