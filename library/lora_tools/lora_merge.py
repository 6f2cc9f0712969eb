"""Merging LoRAs into one LoRA: exactly, by concatenating factors, or with kohya's ``merge_lora.py`` arithmetic.

The sum of two updates ``c1 up1 @ down1 + c2 up2 @ down2`` (``c = ratio * alpha / rank``) is
itself a LoRA of rank ``r1 + r2``: ``[s1 up1, s2 up2] @ [t1 down1; t2 down2]`` with ``s t = c``.
Here ``s = sqrt|c|`` and ``t = sign(c) sqrt|c|`` (balanced factors, the sign on ``down`` like
kohya), and the output's alpha equals its rank, so its scale is 1. Nothing is approximated.

kohya's ``merge_lora.py`` instead sums the factors (``(Σ a_i up_i) @ (Σ b_i down_i)``, which adds
cross terms ``up_i @ down_j`` and applies ``ratio * |ratio|``), or with ``--concat`` concatenates
them but divides every part by the summed rank. ``kohya_merge`` reproduces that arithmetic for
users who need kohya's bytes (sd-scripts ``networks/merge_lora.py``, ``merge_lora_models``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from library.errors import ConfigError
from library.lora_tools.lora_sets import LoRAInput, LoRAModule


@dataclass(frozen=True)
class MergedModule:
    """One module of the merged LoRA, 2-D factors in float64, and the layout to write it in."""

    name: str
    up: torch.Tensor
    down: torch.Tensor
    alpha: float
    down_tail: tuple[int, ...]
    four_d: bool

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """kohya's keys: ``lora_down.weight``, ``lora_up.weight`` (conv layout when four-D) and ``alpha``."""
        up, down = self.up, self.down
        if self.four_d:
            tail = self.down_tail if len(self.down_tail) == 3 else (*self.down_tail, 1, 1)
            up, down = up.reshape(*up.shape, 1, 1), down.reshape(down.shape[0], *tail)
        return {
            f"{self.name}.lora_down.weight": down.to(dtype).contiguous(),
            f"{self.name}.lora_up.weight": up.to(dtype).contiguous(),
            f"{self.name}.alpha": torch.tensor(self.alpha, dtype=dtype),
        }


def _module_order(inputs: list[LoRAInput]) -> list[str]:
    names: dict[str, None] = {}
    for lora in inputs:
        names.update(dict.fromkeys(lora.modules))
    return list(names)


def _parts(inputs: list[LoRAInput], ratios: list[float], name: str) -> list[tuple[float, LoRAModule]]:
    return [(ratio, lora.modules[name]) for lora, ratio in zip(inputs, ratios) if name in lora.modules]


def _shuffled(up: torch.Tensor, down: torch.Tensor, generator: torch.Generator | None):
    """kohya's ``--shuffle``: permute the rank components (the update is unchanged)."""
    if generator is None:
        return up, down
    perm = torch.randperm(down.shape[0], generator=generator)
    return up[:, perm], down[perm]


def exact_merge(inputs: list[LoRAInput], ratios: list[float], shuffle_seed: int | None = None) -> list[MergedModule]:
    """``Σ ratio_i * scale_i * up_i @ down_i`` per module as one LoRA of the summed rank, exactly (float64).

    Parts with ratio 0 are left out; a module all of whose parts have ratio 0 is dropped.
    """
    generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    merged = []
    for name in _module_order(inputs):
        ups, downs = [], []
        parts = _parts(inputs, ratios, name)
        for ratio, module in parts:
            factor = ratio * module.scale
            if factor == 0:
                continue
            root = math.sqrt(abs(factor))
            ups.append(module.up.double() * root)
            downs.append(module.down.double() * math.copysign(root, factor))
        if not ups:
            continue
        up, down = _shuffled(torch.cat(ups, dim=1), torch.cat(downs, dim=0), generator)
        first = parts[0][1]
        merged.append(MergedModule(name, up, down, float(down.shape[0]), first.down_tail, first.four_d))
    return merged


def kohya_merge(
    inputs: list[LoRAInput],
    ratios: list[float],
    merge_dtype: torch.dtype = torch.float32,
    concat: bool = False,
    shuffle_seed: int | None = None,
) -> list[MergedModule]:
    """kohya's ``merge_lora_models`` arithmetic in ``merge_dtype`` (its ``--precision``); factors, not updates.

    Per module, with ``base_alpha`` the alpha of the first file that has it: ``up`` parts are scaled
    by ``|sqrt(alpha / base_alpha) * ratio|``, ``down`` parts by ``sqrt(alpha / base_alpha) * ratio``,
    then summed (shapes must match) or, with ``concat``, concatenated; the alpha is ``base_alpha``.
    """
    generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    merged = []
    for name in _module_order(inputs):
        parts = _parts(inputs, ratios, name)
        first = parts[0][1]
        base_alpha = first.alpha if first.alpha is not None else float(first.rank)
        up = down = None
        for ratio, module in parts:
            alpha = module.alpha if module.alpha is not None else float(module.rank)
            scale = math.sqrt(alpha / base_alpha) * ratio
            part_up, part_down = module.up.to(merge_dtype) * abs(scale), module.down.to(merge_dtype) * scale
            if up is None:
                up, down = part_up, part_down
            elif concat:
                up, down = torch.cat([up, part_up], dim=1), torch.cat([down, part_down], dim=0)
            elif up.shape != part_up.shape:
                raise ConfigError(
                    f"module '{name}': ranks {up.shape[1]} and {part_up.shape[1]} differ; kohya's sum of factors "
                    "needs equal ranks (use the exact merge, or --concat)"
                )
            else:
                up, down = up + part_up, down + part_down
        up, down = _shuffled(up, down, generator)
        merged.append(MergedModule(name, up, down, base_alpha, first.down_tail, first.four_d))
    return merged


def merged_state_dict(modules: list[MergedModule], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: tensor for module in modules for key, tensor in module.tensors(dtype).items()}


def merged_metadata(inputs: list[LoRAInput], ratios: list[float], modules: list[MergedModule]) -> dict[str, str]:
    """kohya's minimum LoRA metadata (version keys of the first file that has them, dim/alpha or ``Dynamic``)."""
    ranks = {m.down.shape[0] for m in modules}
    alphas = {m.alpha for m in modules}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_training_comment": "merged from "
        + ", ".join(f"{lora.path.name} ({r:g})" for lora, r in zip(inputs, ratios)),
    }
    for key in ("ss_v2", "ss_base_model_version"):
        value = next((lora.metadata[key] for lora in inputs if key in lora.metadata), None)
        if value is not None:
            metadata[key] = value
    return metadata
