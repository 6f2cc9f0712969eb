"""The contract between the training loop and a ``--network_module``, written down.

kohya's ``train_network.py`` discovers optional network hooks with ``hasattr`` at each call site;
here the whole set is one :class:`TrainableNetwork` protocol. Our networks implement all of it.
A foreign network (LyCORIS' ``lycoris.kohya``, a kohya network file) is wrapped once by
:func:`as_trainable_network`, which fills the optional hooks with their kohya defaults, so the
loop never probes.

A network module (``networks.lora``, ...) provides two functions, with kohya's signatures::

    create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                   neuron_dropout=None, **network_args) -> network
    create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None,
                                for_inference=False, **network_args) -> (network, weights_sd)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch

from library.errors import ConfigError


@runtime_checkable
class TrainableNetwork(Protocol):
    """Everything ``train_network.py`` calls on a network, in call order."""

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Patch the trainable modules into the models (for the parts being trained)."""

    def load_weights(self, file: str) -> Any:
        """Load ``--network_weights`` into the attached modules."""

    def enable_gradient_checkpointing(self) -> None: ...

    def prepare_optimizer_params(
        self, text_encoder_lr: float | list[float] | None, unet_lr: float | None, default_lr: float
    ) -> tuple[list[dict], list[str]]:
        """Optimizer param groups and one TensorBoard name per group (``unet``, ``textencoder``...)."""

    def prepare_grad_etc(self, text_encoder, unet) -> None: ...

    def on_epoch_start(self, text_encoder, unet) -> None: ...

    def on_step_start(self, text_encoder, unet) -> None: ...

    def get_trainable_params(self) -> Iterable[torch.nn.Parameter]: ...

    def set_multiplier(self, multiplier: float) -> None: ...

    def apply_max_norm_regularization(self, max_norm_value: float, device) -> tuple[int, float, float]:
        """(keys scaled, mean norm, max norm) after rescaling updates whose norm exceeds ``max_norm_value``."""

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None: ...

    def network_metadata(self) -> dict[str, str]:
        """``ss_network_module/dim/alpha/args`` of the network as built (not as requested)."""


class _ForeignNetwork(torch.nn.Module):
    """Adapts a kohya-protocol network that lacks some optional hooks."""

    def __init__(self, network: torch.nn.Module, module_name: str, requested: dict[str, str]):
        super().__init__()
        self.inner = network
        self._module_name = module_name
        self._requested = requested

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def _optional(self, name: str, *args, default=None):
        hook = getattr(self.inner, name, None)
        return hook(*args) if hook is not None else default

    def on_step_start(self, text_encoder, unet) -> None:
        self._optional("on_step_start", text_encoder, unet)

    def set_multiplier(self, multiplier: float) -> None:
        self._optional("set_multiplier", multiplier)

    def apply_max_norm_regularization(self, max_norm_value: float, device):
        hook = getattr(self.inner, "apply_max_norm_regularization", None)
        if hook is None:
            raise ConfigError(f"--scale_weight_norms: network module '{self._module_name}' does not support it")
        return hook(max_norm_value, device)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        """kohya's call: the --text_encoder_lr list only to networks with
        ``prepare_optimizer_params_with_multiple_te_lrs``, its first value to the others (LyCORIS),
        and no default lr to networks whose method takes two arguments."""
        multiple = getattr(self.inner, "prepare_optimizer_params_with_multiple_te_lrs", None)
        if multiple is not None:
            result = multiple(text_encoder_lr, unet_lr, default_lr)
        else:
            if isinstance(text_encoder_lr, (list, tuple)):
                text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
            method = self.inner.prepare_optimizer_params
            parameters = inspect.signature(method).parameters.values()
            takes_default = len(parameters) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in parameters)
            args = (text_encoder_lr, unet_lr, default_lr) if takes_default else (text_encoder_lr, unet_lr)
            result = method(*args)
        if isinstance(result, tuple):
            return result
        return result, [f"group{i}" for i in range(len(result))]

    def network_metadata(self) -> dict[str, str]:
        return dict(self._requested)

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def as_trainable_network(network: Any, module_name: str, requested: dict[str, str]) -> TrainableNetwork:
    """Return ``network`` itself if it implements the protocol, else an adapter with kohya defaults.

    ``requested`` is the ``ss_network_*`` metadata derived from the command line, used only for
    foreign networks that cannot describe themselves.
    """
    if isinstance(network, TrainableNetwork):
        return network
    if not isinstance(network, torch.nn.Module):
        raise ConfigError(
            f"--network_module '{module_name}' returned a {type(network).__name__}, not an nn.Module: "
            "it does not follow kohya's network protocol"
        )
    return _ForeignNetwork(network, module_name, requested)
