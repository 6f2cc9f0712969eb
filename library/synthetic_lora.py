"""Random kohya-format LoRA/LoCon weights shaped like a real UNet and text encoder.

Tests and benchmarks need LoRA files with kohya's module names and layer shapes but no training
run: the targets are found the way kohya's ``networks/lora.py`` finds them (by module class), and
the factors are random with a decaying spectrum, like a trained LoRA's. Works on meta-device
models, so full-size SD shapes cost no memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.models.families import SD1, ModelFamily

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass(frozen=True)
class LoRATarget:
    """One layer a kohya LoRA adapts: where it is and its weight shape."""

    prefix: str  # lora_unet or lora_te
    path: str  # module path in the UNet / text encoder, e.g. down_blocks.0.resnets.0.conv1
    out_features: int
    in_features: int
    kernel_size: tuple[int, int] = (1, 1)
    is_conv: bool = False

    @property
    def name(self) -> str:
        """kohya's module name: prefix and path joined, every ``.`` turned into ``_``."""
        return f"{self.prefix}.{self.path}".replace(".", "_")

    @property
    def uses_conv_dim(self) -> bool:
        """kohya gives ``conv_dim`` to 3x3 convs only; 1x1 convs and linears get ``network_dim``."""
        return self.kernel_size != (1, 1)


def _targets_in(root: torch.nn.Module, prefix: str, classes: tuple[str, ...], conv3x3: bool) -> list[LoRATarget]:
    found = []
    for path, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_path, child in module.named_modules():
            full_path = f"{path}.{child_path}"
            if isinstance(child, torch.nn.Linear):
                found.append(LoRATarget(prefix, full_path, child.out_features, child.in_features))
            elif isinstance(child, torch.nn.Conv2d) and (conv3x3 or child.kernel_size == (1, 1)):
                kernel = tuple(child.kernel_size)
                found.append(
                    LoRATarget(prefix, full_path, child.out_channels, child.in_channels, kernel, is_conv=True)
                )
    return found


def kohya_lora_targets(
    unet: torch.nn.Module | None,
    text_encoder: torch.nn.Module | None,
    conv: bool = True,
    family: ModelFamily = SD1,
) -> list[LoRATarget]:
    """kohya's LoRA targets (``lora_te_*`` then ``lora_unet_*``); ``conv`` adds the LoCon ResNet/sampler layers.

    SD1.5: 72 text-encoder + 192 UNet modules, 278 UNet modules with ``conv``.
    """
    targets = []
    if text_encoder is not None:
        (prefix,) = family.kohya_text_encoder_prefixes
        targets += _targets_in(text_encoder, prefix, TEXT_ENCODER_TARGETS, conv3x3=False)
    if unet is not None:
        classes = UNET_TARGETS + (UNET_CONV_TARGETS if conv else ())
        targets += _targets_in(unet, family.kohya_unet_prefix, classes, conv3x3=conv)
    return targets


def random_lora(
    targets: list[LoRATarget],
    dim: int,
    alpha: float,
    conv_dim: int | None = None,
    conv_alpha: float | None = None,
    decay: float = 0.8,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """kohya tensors (``lora_down.weight`` [r, in(, kh, kw)], ``lora_up.weight`` [out, r(, 1, 1)], 0-dim ``alpha``).

    The i-th column of ``up`` is scaled by ``(i + 1) ** -decay``, so singular values fall off like a
    trained LoRA's instead of being flat.
    """
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for target in targets:
        rank, module_alpha = (conv_dim, conv_alpha) if target.uses_conv_dim and conv_dim else (dim, alpha)
        fan_in = target.in_features * target.kernel_size[0] * target.kernel_size[1]
        spectrum = torch.arange(1, rank + 1, dtype=torch.float32) ** -decay
        up = torch.randn(target.out_features, rank, generator=generator) * (spectrum / target.out_features**0.5)
        down = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        if target.is_conv:
            up, down = up.reshape(*up.shape, 1, 1), down.reshape(rank, target.in_features, *target.kernel_size)
        state_dict[f"{target.name}.lora_down.weight"] = down.to(dtype)
        state_dict[f"{target.name}.lora_up.weight"] = up.to(dtype)
        state_dict[f"{target.name}.alpha"] = torch.tensor(float(module_alpha), dtype=dtype)
    return state_dict


def decaying_matrix(rows: int, cols: int, decay: float, seed: int = 0) -> torch.Tensor:
    """A random float32 matrix, singular values falling roughly like ``i ** -decay`` (a fine-tune's weight change)."""
    generator = torch.Generator().manual_seed(seed)
    inner = min(rows, cols)
    left = torch.randn(rows, inner, generator=generator) * torch.arange(1, inner + 1) ** -decay
    return left @ torch.randn(inner, cols, generator=generator) / cols**0.5
