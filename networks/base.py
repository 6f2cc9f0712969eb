"""The machinery every network family of this suite shares, on kohya's ``--network_module`` protocol.

A family (LoRA, Light LoRA, narrow feed-forwards) declares three things and inherits the rest:

* an args dataclass, subclass of ``NetworkArgs`` (or ``LowRankArgs``) from :mod:`networks.network_args`:
  its ``--network_args`` with types and defaults, parsed once by ``parse_network_args``;
* a module class, subclass of :class:`NetworkModule` (``forward`` and ``delta_weight``), or of
  :class:`LowRankModule` (only ``down_weight`` and ``up_weight``, in kohya's layout);
* ``create_network`` / ``create_network_from_weights`` that pick layers with :func:`find_targets`,
  build one module per layer and wrap them in a :class:`Network`.

The base owns target discovery and kohya's key names (``networks.targets``), attaching by forward
patching (``networks.modules``: the base model's module tree and ``state_dict`` keys never change;
:meth:`Network.restore` undoes it), merging, weight files, optimizer groups (block-wise lr weights,
LoRA+), multiplier, dropouts and max-norm, and the helpers every family's ``create_network_from_weights``
uses. Everything a family needs is importable from here.

Imports only torch and ``networks/`` siblings: kohya users copy network files into their own checkout.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from networks.errors import NetworkError, NetworkStateError, NetworkWeightsError
from networks.lora_file import load_lora_file, save_lora_file
from networks.modules import LowRankModule, NetworkModule
from networks.network_args import NetworkArgs
from networks.targets import (
    TEXT_ENCODER_PARENTS,
    TEXT_ENCODER_PREFIX,
    TEXT_MODEL_LEVEL,
    UNET_CONV_PARENTS,
    UNET_PREFIX,
    UNET_TRANSFORMER_PARENTS,
    Target,
    block_index,
    block_layout,
    find_targets,
    is_3x3,
    layer_targets,
    targets_named_in,
    uniform,
)

# What families, tools and kohya-checkout users import from here (the pieces live in siblings).
__all__ = [
    "TEXT_ENCODER_PARENTS", "TEXT_ENCODER_PREFIX", "TEXT_MODEL_LEVEL", "UNET_CONV_PARENTS", "UNET_PREFIX",
    "UNET_TRANSFORMER_PARENTS", "LowRankModule", "Network", "NetworkError", "NetworkModule", "NetworkStateError",
    "NetworkWeightsError", "Target", "block_index", "block_layout", "find_targets", "is_3x3", "layer_targets",
    "targets_named_in", "uniform", "warn_ignored_args",
]  # fmt: skip

logger = logging.getLogger(__name__)


def warn_ignored_args(names: Sequence[str], reason: str) -> None:
    """One warning for ``network_args`` a network built from weights does not use."""
    if names:
        logger.warning(f"network_args {', '.join(names)} ignored: {reason}")


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
        # kohya tells SDXL from the UNet keys too (prepare_optimizer_params); its blocks are numbered differently.
        self.block_lr_weight = args.block_lr_weights(block_layout(m.lora_name for m in modules))
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
