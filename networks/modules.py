"""One adapted layer: the module base every family's modules build on.

:class:`NetworkModule` holds the original layer unregistered and takes over its ``forward`` (the base
model's tree and ``state_dict`` keys never change); :class:`LowRankModule` adds kohya's low-rank
forward, dropouts, delta weight and max-norm scaling, so a low-rank family only declares its factors.

Imports only torch and ``networks/`` siblings: kohya users copy network files into their own checkout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from networks.errors import NetworkError, NetworkStateError
from networks.targets import TEXT_ENCODER_PREFIX


class NetworkModule(nn.Module):
    """One adapted layer. Holds the original layer unregistered and takes over its ``forward``.

    A family implements :meth:`forward` (calling ``self.original_forward`` for the base output) and
    :meth:`delta_weight`; merging and max-norm are built on those.
    """

    LORAPLUS_PARAMS: ClassVar[tuple[str, ...]] = ()  # parameter-name prefixes that LoRA+ trains at lr * ratio
    MERGEABLE: ClassVar[bool] = True  # False for families without a delta weight (merge and max-norm refuse)

    def __init__(self, lora_name: str, original: nn.Module, multiplier: float = 1.0):
        super().__init__()
        self.lora_name = lora_name
        self.multiplier = multiplier
        # Unregistered, so the network's .to(), state_dict() and parameters() never touch the base model.
        object.__setattr__(self, "_original", original)
        self.original_forward: Callable | None = None
        self._patched_over: Callable | None = None

    @property
    def original(self) -> nn.Module:
        return self._original

    @property
    def is_text_encoder(self) -> bool:
        return self.lora_name.startswith(TEXT_ENCODER_PREFIX)

    @property
    def is_applied(self) -> bool:
        return self.original_forward is not None

    def apply(self) -> None:
        """Route the original layer's calls through this module; its hooks and tree stay as they are."""
        if self.is_applied:
            raise NetworkStateError(f"{self.lora_name} is already applied")
        self._patched_over = self._original.__dict__.get("forward")  # another network's patch, if any
        self.original_forward = self._original.forward
        self._original.forward = self.forward

    def restore(self) -> None:
        """Give the original layer its forward back (networks stacked on one layer restore last-first)."""
        if not self.is_applied:
            return
        if self._original.__dict__.get("forward") != self.forward:  # restoring now would drop the later patch
            raise NetworkStateError(f"{self.lora_name}: another network was applied over this one; restore it first")
        if self._patched_over is None:
            del self._original.forward
        else:
            self._original.forward = self._patched_over
        self.original_forward = self._patched_over = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def delta_weight(self) -> torch.Tensor:
        """The change of ``original.weight`` at multiplier 1 (alpha scaling included), in float32 or wider."""
        raise NotImplementedError(f"{type(self).__name__} must implement delta_weight")

    def delta_norm(self) -> torch.Tensor:
        """Frobenius norm of :meth:`delta_weight` (families may compute it without materialising it)."""
        return torch.linalg.vector_norm(self.delta_weight())

    def scale_delta_(self, ratio: float) -> None:
        """Multiply the delta weight by ``ratio`` in place (``--scale_weight_norms``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement scale_delta_")

    @torch.no_grad()
    def merge_(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Add ``multiplier * delta`` into the original weight, computed in float32 (or wider) on ``device``."""
        weight = self._original.weight
        delta = self.delta_weight().to(device or weight.device)
        merged = weight.to(delta.device, torch.promote_types(weight.dtype, delta.dtype)) + self.multiplier * delta
        weight.copy_(merged.to(dtype) if dtype is not None else merged)


class LowRankModule(NetworkModule):
    """``original(x) + up(down(x)) * multiplier * alpha / rank``, with kohya's three dropouts.

    A family supplies :meth:`down_weight` ``(rank, in[, kh, kw])`` and :meth:`up_weight` ``(out, rank[, 1, 1])``
    in kohya's layout (``down`` has the original conv's kernel, stride and padding; ``up`` is 1x1); the
    forward, delta weight and max-norm scaling follow from them. ``alpha`` is a float32 buffer.
    """

    LORAPLUS_PARAMS = ("lora_up",)

    def __init__(
        self,
        lora_name: str,
        original: nn.Module,
        rank: int,
        alpha: float | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__(lora_name, original, multiplier)
        self._conv_args = _conv_args(lora_name, original)
        self.lora_dim = rank
        alpha = float(alpha) if alpha else float(rank)  # alpha 0 or None: no scaling (kohya)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / rank
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout

    @property
    def is_conv(self) -> bool:
        return self._conv_args is not None

    def down_weight(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement down_weight")

    def up_weight(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement up_weight")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.original_forward(x, *args, **kwargs)
        if self.multiplier == 0 or (self.training and self.module_dropout and torch.rand(()) < self.module_dropout):
            return out
        hidden = self._down(x)
        scale = self.multiplier * self.scale
        if self.training:
            hidden, scale = self._dropouts(hidden, scale)
        # Scaling the rank-wide hidden state costs a fraction of scaling the output.
        return out + self._up(hidden * scale)

    # Weights follow the activations' dtype (what autocast would do), so a float32 network also runs
    # on a half-precision model without autocast.
    def _down(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.down_weight().to(x.dtype)
        return F.linear(x, weight) if self._conv_args is None else F.conv2d(x, weight, None, **self._conv_args)

    def _up(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.up_weight().to(hidden.dtype)
        return F.linear(hidden, weight) if self._conv_args is None else F.conv2d(hidden, weight)

    def _dropouts(self, hidden: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
        if self.dropout:
            hidden = F.dropout(hidden, p=self.dropout)
        if self.rank_dropout:
            # One keep-mask of rank channels per sample; rescaled as if the rank had shrunk (kohya).
            shape = [hidden.shape[0]] + [1] * (hidden.dim() - 1)
            shape[1 if self.is_conv else -1] = self.lora_dim
            keep = torch.rand(shape, device=hidden.device) > self.rank_dropout
            hidden = hidden * keep.to(hidden.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return hidden, scale

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = self.up_weight(), self.down_weight()
        dtype = torch.promote_types(up.dtype, torch.float32)
        return up.to(dtype).flatten(1), down.to(dtype).flatten(1)

    def delta_weight(self) -> torch.Tensor:
        up, down = self._factors()
        return (up @ down).view(self._original.weight.shape) * self.scale

    def delta_norm(self) -> torch.Tensor:
        # |U D|_F^2 = sum((U^T U) * (D D^T)): two rank x rank Gram matrices instead of the out x in product.
        up, down = self._factors()
        squared = ((up.T @ up) * (down @ down.T)).sum().clamp(min=0)
        return squared.sqrt() * abs(self.scale)

    @torch.no_grad()
    def scale_delta_(self, ratio: float) -> None:
        """kohya's max-norm step: both factors times sqrt(ratio). Assumes the delta is the product of the
        module's two parameters; a family with another parametrisation overrides this."""
        for param in self.parameters():
            param.mul_(math.sqrt(ratio))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "alpha" not in state_dict and any(key.startswith(prefix) for key in state_dict):
            state_dict[prefix + "alpha"] = torch.tensor(float(self.lora_dim))  # no alpha: scale 1, as everywhere
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scale = self.alpha.item() / self.lora_dim


def _conv_args(name: str, original: nn.Module) -> dict | None:
    if isinstance(original, nn.Linear):
        return None
    if isinstance(original, nn.Conv2d) and original.groups == 1 and original.padding_mode == "zeros":
        return {"stride": original.stride, "padding": original.padding, "dilation": original.dilation}
    raise NetworkError(f"{name}: cannot adapt {original!r} (only Linear and ungrouped zero-padded Conv2d)")
