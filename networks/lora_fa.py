"""LoRA-FA (frozen-A LoRA) for Stable Diffusion 1.x/2.x, a drop-in for kohya's ``networks.lora_fa`` (GUI: "LoRA-FA").

A LoRA whose ``lora_down`` (A) is a frozen random projection, drawn once from a normal with std
``sqrt(2 / (in + rank))`` (kohya's, after the paper; ``in`` is the input channels, also for convs); only
``lora_up`` (B) trains, from zero. The frozen ``lora_down`` is saved with ``lora_up`` and ``alpha``, so
the file is a plain kohya LoRA file that every consumer loads, and ``--network_weights`` resumes it exactly.

Targets, key names, ranks and ``--network_args`` are those of :mod:`networks.lora` (``conv_dim``,
``conv_alpha``, the dropouts, block dims/alphas, block lr weights), except LoRA+: with only ``lora_up``
training, its ratio would just be a second learning rate (kohya's lora_fa ignores it; here it is refused).

Differences from kohya's module, on purpose: there ``lora_down`` is a parameter that ``requires_grad_(True)``
turns back on, so its gradient is computed (and counted in ``--max_grad_norm``'s norm) though never
applied, and ``--scale_weight_norms`` rescales it. Here it is a buffer: no gradient, no optimizer
state, and max-norm scales only ``lora_up`` (to the same delta weight).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from networks.lora import LoRAArgs, LoRAModule, LoRANetwork
from networks.lora import create_network as create_lora_network
from networks.lora import create_network_from_weights as create_lora_from_weights
from networks.network_args import NetworkArgsError, parse_network_args

_LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


@dataclass
class LoRAFAArgs(LoRAArgs):
    """kohya ``networks.lora_fa``'s ``--network_args``: LoRA's, without LoRA+."""

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [name for name in _LORAPLUS if getattr(self, name) is not None]
        if given:
            raise NetworkArgsError(
                f"network_args {given[0]}: LoRA-FA trains only lora_up, so a LoRA+ ratio would just scale its "
                "learning rate; set --unet_lr / --text_encoder_lr instead"
            )


class FrozenWeight(nn.Module):
    """A ``weight`` kept as a buffer: saved and moved with the module (``<name>.lora_down.weight``), never trained."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)


class LoRAFAModule(LoRAModule):
    """kohya's LoRA-FA module: a frozen normal ``lora_down`` and a zero ``lora_up``, so it starts as a no-op."""

    def __init__(self, lora_name: str, original: nn.Module, rank: int, alpha: float | None, **kwargs):
        super().__init__(lora_name, original, rank, alpha, **kwargs)
        down = self.lora_down.weight.detach()
        nn.init.normal_(down, std=math.sqrt(2.0 / (down.shape[1] + rank)))
        self.lora_down = FrozenWeight(down)

    @torch.no_grad()
    def scale_delta_(self, ratio: float) -> None:
        """The delta is linear in ``lora_up``: scaling it alone by ``ratio`` keeps ``lora_down`` frozen."""
        self.lora_up.weight.mul_(ratio)


class LoRAFANetwork(LoRANetwork):
    """The network ``create_network`` builds; only the ``lora_up`` weights are parameters."""


def _as_lora_fa(shaped: LoRANetwork) -> LoRAFANetwork:
    """``shaped``'s layers, ranks, alphas and args, each module made a LoRA-FA module."""
    modules = [
        LoRAFAModule(
            m.lora_name, m.original, m.lora_dim, m.alpha.item(), multiplier=m.multiplier, dropout=m.dropout,
            rank_dropout=m.rank_dropout, module_dropout=m.module_dropout,
        )
        for m in shaped.adapters
    ]  # fmt: skip
    args = LoRAFAArgs(**dataclasses.asdict(shaped.args))
    return LoRAFANetwork(__name__, modules, args, shaped.dim, shaped.alpha, shaped.multiplier)


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | list[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **network_args: str,
) -> LoRAFANetwork:
    """A new LoRA-FA network on LoRA's layers with LoRA's ranks; kohya's signature (``vae`` is unused).

    The layers and ranks are :mod:`networks.lora`'s, built by it (a transient LoRA network, as large as
    this one: simpler than a second copy of its rules).
    """
    parse_network_args(LoRAFAArgs, network_args)  # LoRA-FA's refusals before anything is built
    shaped = create_lora_network(
        multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout, **network_args
    )
    return _as_lora_fa(shaped)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | list[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **network_args: str,
) -> tuple[LoRANetwork, Mapping[str, torch.Tensor]]:
    """A network shaped like ``file``, read by :mod:`networks.lora`'s rules; weights are not loaded (kohya).

    ``for_inference`` returns that plain LoRA network: at inference a LoRA-FA file is a LoRA file.
    """
    parse_network_args(LoRAFAArgs, network_args)
    shaped, weights_sd = create_lora_from_weights(
        multiplier, file, vae, text_encoder, unet, weights_sd, for_inference, **network_args
    )
    return (shaped if for_inference else _as_lora_fa(shaped)), weights_sd
