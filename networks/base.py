"""The machinery every network family of this suite shares, on kohya's ``--network_module`` protocol.

A family (LoRA, Light LoRA, narrow feed-forwards) declares three things and inherits the rest:

* an args dataclass, subclass of ``NetworkArgs`` (or ``LowRankArgs``) from :mod:`networks.network_args`:
  its ``--network_args`` with types and defaults, parsed once by ``parse_network_args``;
* a module class, subclass of :class:`NetworkModule` (``forward`` and ``delta_weight``), or of
  :class:`LowRankModule` (only ``down_weight`` and ``up_weight``, in kohya's layout);
* ``create_network`` / ``create_network_from_weights`` that pick layers with :func:`find_targets`,
  build one module per layer and wrap them in a :class:`Network`.

The base owns target discovery and kohya's key names, attaching by forward patching (the base
model's module tree and ``state_dict`` keys never change; :meth:`Network.restore` undoes it), merging,
weight files, optimizer groups (block-wise lr weights, LoRA+), multiplier, dropouts and max-norm.

Imports only torch and ``networks/`` siblings: kohya users copy network files into their own checkout.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from networks.lora_file import load_lora_file, save_lora_file
from networks.network_args import MID_BLOCK, NetworkArgs, NetworkError
from networks.sgm_names import unet_path_renamer

logger = logging.getLogger(__name__)

UNET_PREFIX, TEXT_ENCODER_PREFIX = "lora_unet", "lora_te"
# kohya's target parents, matched by class name anywhere in the class's MRO (subclasses match too).
UNET_TRANSFORMER_PARENTS = ("Transformer2DModel",)
UNET_CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
# transformers >= 5.6 dropped this level from CLIPTextModel; every file keeps it (kohya, A1111, diffusers).
TEXT_MODEL_LEVEL = "text_model"

_UP_DOWN_BLOCK = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


class NetworkWeightsError(NetworkError):
    """A weights file does not fit the network or the model (message names the key)."""


class NetworkStateError(NetworkError):
    """A call that does not fit the network's state, such as merging while applied."""


# --------------------------------------------------------------------------------------------------
# Targets and names
# --------------------------------------------------------------------------------------------------


def block_index(lora_name: str) -> int:
    """kohya's SD1/2 block of a UNet key: 1 + 3i + j for down block i, 12 for mid, 13 + 3i + j for up; -1 else."""
    match = _UP_DOWN_BLOCK.search(lora_name)
    if match:
        direction, i, kind, j = match.groups()
        within = 3 * int(i) + (2 if kind.endswith("samplers") else int(j))
        return 1 + within if direction == "down" else MID_BLOCK + 1 + within
    return MID_BLOCK if "mid_block_" in lora_name else -1


@dataclass(frozen=True)
class Target:
    """One layer to adapt and its kohya name (``lora_unet_…`` / ``lora_te_…``, without ``.lora_down``)."""

    name: str
    module: nn.Module

    @property
    def is_text_encoder(self) -> bool:
        return self.name.startswith(TEXT_ENCODER_PREFIX)

    @property
    def block(self) -> int:
        return -1 if self.is_text_encoder else block_index(self.name)


def _has_class(module: nn.Module, names: Sequence[str]) -> bool:
    return any(cls.__name__ in names for cls in type(module).__mro__)


def _find(
    root: nn.Module, prefix: str, parents: Sequence[str], accept, level: str | None, rename=None
) -> list[Target]:
    targets, seen = [], set()
    for parent_name, parent in root.named_modules():
        if not _has_class(parent, parents):
            continue
        for child_name, child in parent.named_modules():
            if not child_name or id(child) in seen or not accept(child_name, child):
                continue
            seen.add(id(child))
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            if level and not path.startswith(level + "."):
                path = f"{level}.{path}"
            if rename is not None:
                path = rename(path)
            targets.append(Target(f"{prefix}.{path}".replace(".", "_"), child))
    return targets


def find_targets(
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    unet_parents: Sequence[str],
    accept: Callable[[str, nn.Module], bool],
    text_encoder_parents: Sequence[str] = TEXT_ENCODER_PARENTS,
) -> list[Target]:
    """Layers ``accept``-ed inside modules whose class is one of the parents, named as kohya names them.

    ``accept(child_name, child)`` picks layers within a parent. Text-encoder names always carry
    ``text_model.``, also when the model passed in lacks that level. A diffusers SDXL UNet's layers get
    kohya's SDXL (SGM) names, ``lora_unet_input_blocks_4_1_…`` (see :mod:`networks.sgm_names`).
    """
    encoders = text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    encoders = [encoder for encoder in encoders if encoder is not None]
    targets = []
    for i, encoder in enumerate(encoders):
        prefix = TEXT_ENCODER_PREFIX if len(encoders) == 1 else f"{TEXT_ENCODER_PREFIX}{i + 1}"
        targets += _find(encoder, prefix, text_encoder_parents, accept, TEXT_MODEL_LEVEL)
    if unet is not None:
        targets += _find(unet, UNET_PREFIX, unet_parents, accept, None, unet_path_renamer(unet))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise NetworkError(f"two layers map to the same key '{duplicate}'")
    return targets


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------


def _part(key: str) -> str | None:
    if key.startswith(TEXT_ENCODER_PREFIX):
        return "text encoder"
    return "U-Net" if key.startswith(UNET_PREFIX) else None


def _conform(key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``value`` in ``shape``, also across 1x1 conv <-> Linear (SD2 proj_in/out are either, by loader)."""
    if value.shape == shape:
        return value

    def squeezed(s):
        s = list(s)
        while s and s[-1] == 1:
            s.pop()
        return s

    if squeezed(value.shape) == squeezed(shape):
        return value.reshape(shape)
    raise NetworkWeightsError(f"'{key}' has shape {tuple(value.shape)} but this network needs {tuple(shape)}")


class Network(nn.Module):
    """A set of adapted layers with every method kohya's ``train_network.py`` calls on a network.

    ``dim`` and ``alpha`` are what ``ss_network_dim``/``ss_network_alpha`` report: the values the
    network was built with (``"Dynamic"`` when read from a file with mixed ranks).
    """

    def __init__(
        self,
        module_name: str,
        modules: Sequence[NetworkModule],
        args: NetworkArgs,
        dim: int | str | None,
        alpha: float | str | None,
        multiplier: float = 1.0,
    ):
        super().__init__()
        if not modules:
            raise NetworkError("no layer of the text encoder or U-Net was selected: the network would be empty")
        self.module_name, self.args, self.dim, self.alpha = module_name, args, dim, alpha
        self.multiplier = multiplier
        self.block_lr_weight = args.block_lr_weights()
        for module in modules:
            module.multiplier = multiplier
            self.add_module(module.lora_name, module)

    @property
    def adapters(self) -> list[NetworkModule]:
        return [m for m in self.children() if isinstance(m, NetworkModule)]

    @property
    def text_encoder_loras(self) -> list[NetworkModule]:
        return [m for m in self.adapters if m.is_text_encoder]

    @property
    def unet_loras(self) -> list[NetworkModule]:
        return [m for m in self.adapters if not m.is_text_encoder]

    # -- attaching -------------------------------------------------------------------------------

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Patch the layers this network was built on; a part not applied is dropped, as in kohya."""
        for module in self.adapters:
            if not (apply_text_encoder if module.is_text_encoder else apply_unet):
                delattr(self, module.lora_name)
        self._check_models(text_encoder, unet)
        for module in self.adapters:
            module.apply()

    def _check_models(self, text_encoder, unet) -> None:
        """Refuse models other than those the network was built on (kohya patches the old ones silently)."""
        for models, modules, part in (
            (text_encoder, self.text_encoder_loras, "text encoder"),
            (unet, self.unet_loras, "U-Net"),
        ):
            if models is None or not modules:
                continue
            inside = {
                id(m) for model in (models if isinstance(models, (list, tuple)) else [models]) for m in model.modules()
            }
            if any(id(module.original) not in inside for module in modules):
                raise NetworkStateError(f"this network was built on another {part} than the one passed")

    def restore(self) -> None:
        """Undo :meth:`apply_to`: every adapted layer gets its own forward back."""
        for module in self.adapters:
            module.restore()

    def is_mergeable(self) -> bool:
        return all(module.MERGEABLE for module in self.adapters)

    def _require_delta_weights(self, operation: str) -> None:
        if not self.is_mergeable():
            raise NetworkStateError(f"{operation} needs delta weights, which {self.module_name} modules do not have")

    def merge_to(self, text_encoder=None, unet=None, weights_sd=None, dtype=None, device=None) -> None:
        """Add the deltas into the base weights (kohya's ``--base_weights``); ``weights_sd`` is loaded first
        and then only its modules are merged."""
        self._require_delta_weights("merge_to")
        if any(module.is_applied for module in self.adapters):
            raise NetworkStateError("merge_to on an applied network would count the delta twice; restore() first")
        self._check_models(text_encoder, unet)
        modules = self.adapters
        if weights_sd is not None:
            self.load_weights(weights_sd)
            names = {key.partition(".")[0] for key in weights_sd}
            modules = [m for m in modules if m.lora_name in names]
        for module in modules:
            module.merge_(dtype, device)

    # -- weights ---------------------------------------------------------------------------------

    def state_dict_for_file(self) -> dict[str, torch.Tensor]:
        """The tensors :meth:`save_weights` writes (a family with training-only parameters bakes them here)."""
        return self.state_dict()

    def network_metadata(self) -> dict[str, str]:
        return {
            "ss_network_module": self.module_name,
            "ss_network_dim": str(self.dim),
            "ss_network_alpha": str(self.alpha),
            "ss_network_args": json.dumps(self.args.to_metadata()),
        }

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: dict | None) -> dict:
        """Write ``file`` atomically; the network's own ``ss_network_*`` override those in ``metadata``."""
        return save_lora_file(file, self.state_dict_for_file(), {**(metadata or {}), **self.network_metadata()}, dtype)

    def load_weights(self, file: str | os.PathLike | Mapping[str, torch.Tensor]):
        """Load a file or state dict; returns ``(missing_keys, unexpected_keys)`` like ``load_state_dict``.

        Keys of a part (text encoder / U-Net) that this network does not have are ignored with a
        warning; any other key that fits no module raises :class:`NetworkWeightsError`. Missing keys
        (e.g. a file trained on the U-Net only) leave those modules as they are.
        """
        weights = load_lora_file(file)[0] if isinstance(file, (str, os.PathLike)) else file
        own = self.state_dict()
        own_parts = {_part(key) for key in own}
        usable, ignored, unexpected = {}, [], []
        for key, value in weights.items():
            if key in own:
                usable[key] = _conform(key, value, own[key].shape)
            elif _part(key) is not None and _part(key) not in own_parts:
                ignored.append(key)
            else:
                unexpected.append(key)
        if unexpected:
            raise NetworkWeightsError(
                f"{len(unexpected)} weights fit no module of this network, e.g. '{unexpected[0]}' "
                "(was it trained on another model or with other network_args such as conv_dim or block_dims?)"
            )
        if ignored:
            logger.warning(f"ignored {len(ignored)} {_part(ignored[0])} weights: this network does not train it")
        result = self.load_state_dict(usable, strict=False)
        if result.missing_keys:
            logger.warning(f"{len(result.missing_keys)} weights not in the file, e.g. '{result.missing_keys[0]}'")
        return result

    # -- training hooks --------------------------------------------------------------------------

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for module in self.adapters:
            module.multiplier = multiplier

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the adapted model checkpoints its blocks, and these modules recompute with them."""

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def on_step_start(self, text_encoder=None, unet=None) -> None:
        pass

    def get_trainable_params(self) -> Iterable[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def prepare_optimizer_params(
        self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None, default_lr: float | None = None
    ) -> tuple[list[dict], list[str]]:
        """kohya's param groups: text encoder, then U-Net (one group per block with block lr weights);
        LoRA+ puts ``LORAPLUS_PARAMS`` in ``… plus`` groups at lr * ratio; groups with lr None or 0 are dropped."""
        self.requires_grad_(True)
        if isinstance(text_encoder_lr, (list, tuple)):
            text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
        te_lr = default_lr if text_encoder_lr is None else text_encoder_lr
        unet_lr = default_lr if unet_lr is None else unet_lr
        args = self.args
        te_ratio = args.loraplus_text_encoder_lr_ratio or args.loraplus_lr_ratio
        unet_ratio = args.loraplus_unet_lr_ratio or args.loraplus_lr_ratio

        groups: list[tuple[str, list[NetworkModule], float | None, float | None]] = []
        groups.append(("textencoder", self.text_encoder_loras, te_lr, te_ratio))
        if self.block_lr_weight is None:
            groups.append(("unet", self.unet_loras, unet_lr, unet_ratio))
        else:
            by_block: dict[int, list[NetworkModule]] = {}
            for module in self.unet_loras:
                by_block.setdefault(block_index(module.lora_name), []).append(module)
            for block, modules in by_block.items():
                lr = None if unet_lr is None else unet_lr * self.block_lr_weight[block]
                groups.append((f"unet_block{block}", modules, lr, unet_ratio))

        params, descriptions = [], []
        for name, modules, lr, ratio in groups:
            for group, description in _param_groups(name, modules, lr, ratio):
                params.append(group)
                descriptions.append(description)
        return params, descriptions

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device=None) -> tuple[int, float, float]:
        """kohya's ``--scale_weight_norms``: deltas whose norm exceeds the value are scaled down to it.

        Returns (modules scaled, mean norm, max norm) after scaling. One host sync for all modules.
        """
        self._require_delta_weights("--scale_weight_norms")
        modules = self.adapters
        if not modules:
            return 0, 0.0, 0.0
        norms = torch.stack([module.delta_norm() for module in modules])
        clamped = norms.clamp(min=max_norm_value / 2)
        norms, ratios = torch.stack([norms, clamped.clamp(max=max_norm_value) / clamped]).tolist()
        scaled = 0
        for module, ratio in zip(modules, ratios):
            if ratio != 1.0:
                module.scale_delta_(ratio)
                scaled += 1
        final = [norm * ratio for norm, ratio in zip(norms, ratios)]
        return scaled, sum(final) / len(final), max(final)


def _param_groups(name: str, modules: Sequence[NetworkModule], lr: float | None, ratio: float | None):
    """(group, description) for the plain and the LoRA+ parameters of ``modules``; lr None or 0 drops a group."""
    plain, plus = [], []
    for module in modules:
        for param_name, param in module.named_parameters():
            is_plus = ratio is not None and param_name.startswith(module.LORAPLUS_PARAMS)
            (plus if is_plus else plain).append(param)
    if not lr:
        return
    if plain:
        yield {"params": plain, "lr": lr}, name
    if plus:
        yield {"params": plus, "lr": lr * ratio}, f"{name} plus"
