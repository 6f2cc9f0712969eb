"""The three transforms kohya's ``train_util.IMAGE_TRANSFORMS`` builds, with torchvision's arithmetic.

kohya sd-scripts turns every training image into a tensor with
``Compose([ToTensor(), Normalize([0.5], [0.5])])``: uint8 HWC pixels to float CHW in [0, 1], then
``(x - mean) / std`` per channel, the same float operations in the same order as torchvision, so the
tensors are torchvision's bit for bit. Anything else raises, so a kohya code path this stand-in does not
cover fails loudly instead of computing something else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


class Compose:
    """Applies the transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any) -> Any:
        for transform in self.transforms:
            image = transform(image)
        return image


class ToTensor:
    """A uint8 PIL image or HxW(xC) array to a CxHxW float tensor divided by 255 (torchvision's ``to_tensor``).

    Other pixel types (16-bit, float, 1-bit PIL modes) raise: torchvision treats them differently and
    kohya never passes them.
    """

    def __call__(self, picture: Any) -> torch.Tensor:
        array = np.array(picture)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise RuntimeError(
                f"torchvision stand-in: ToTensor takes uint8 HxW or HxWxC images, got {array.dtype} {array.shape}"
            )
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(array.transpose((2, 0, 1))).contiguous()
        return tensor.to(dtype=torch.get_default_dtype()).div(255)


class Normalize:
    """``(x - mean) / std`` per channel of a float (..., C, H, W) tensor (torchvision's ``normalize``)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> None:
        self.mean, self.std, self.inplace = mean, std, inplace

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            raise TypeError(f"torchvision stand-in: Normalize takes a float tensor, got {tensor.dtype}")
        if tensor.ndim < 3:
            raise ValueError(f"torchvision stand-in: Normalize takes (..., C, H, W), got shape {tuple(tensor.shape)}")
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device)
        if (std == 0).any():
            raise ValueError("torchvision stand-in: Normalize's std has a zero")
        if mean.ndim == 1:
            mean = mean.view(-1, 1, 1)
        if std.ndim == 1:
            std = std.view(-1, 1, 1)
        if not self.inplace:
            tensor = tensor.clone()
        return tensor.sub_(mean).div_(std)


def __getattr__(name: str) -> Any:
    raise AttributeError(f"torchvision stand-in: transforms.{name} not available")


from . import functional  # noqa: E402,F401
