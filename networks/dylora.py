"""DyLoRA for Stable Diffusion 1.x/2.x, a drop-in for kohya's ``networks.dylora`` (the GUI's "Kohya DyLoRA").

A LoRA whose rank ``r`` is trained as nested ranks: at each step every module draws a trainable rank
``b`` from ``{0, unit, 2·unit, …} < r`` (kohya's rule: ``randint(0, r - 1)`` rounded down to a multiple
of ``unit``) and only rows ``b … b + unit - 1`` of ``lora_down`` and columns of ``lora_up`` get a gradient.
The training forward is kohya's: all ``r`` rows, scaled by ``alpha / r · sqrt(r / (b + unit))``. (The
DyLoRA paper, and LyCORIS' ``algo=dylora``, use only the first ``b + unit`` rows with ``alpha / b``;
kohya's files and ours follow kohya.) In eval mode the module is a plain LoRA (``alpha / r``), as every
consumer computes the file. ``networks/extract_lora_from_dylora.py`` cuts a file to ranks ``unit, 2·unit, …``.

Files are plain kohya LoRA files (``lora_down.weight`` = rows stacked, ``lora_up.weight`` = columns side by
side, ``alpha``), with kohya's targets and names, so kohya, A1111, ComfyUI and diffusers load them.

Layers, ranks and ``--network_args`` are :mod:`networks.lora`'s, plus ``unit`` (default 1), which must divide
every rank. kohya's dylora reads only ``unit``, ``conv_dim`` (which it requires to equal ``network_dim``;
its convs get ``network_alpha``) and the LoRA+ ratios (on ``lora_up``); here ``conv_alpha``, the dropouts,
block dims/alphas and block lr weights act as in :mod:`networks.lora`. Unknown keys raise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from networks.base import LowRankModule, Network
from networks.lora import DEFAULT_DIM, LoRAArgs, LoRANetwork
from networks.lora import create_network as create_lora_network
from networks.lora import create_network_from_weights as create_lora_from_weights
from networks.network_args import NetworkArgsError, parse_network_args

_DOWN, _UP = "lora_A", "lora_B"  # one parameter per rank, named after kohya's ParameterLists
_FILE_KEYS = (("lora_down.weight", _DOWN, 0), ("lora_up.weight", _UP, 1))  # file key, row prefix, stacking dim


@dataclass
class DyLoRAArgs(LoRAArgs):
    """kohya ``networks.dylora``'s ``--network_args``, typed: ``unit`` plus :mod:`networks.lora`'s."""

    unit: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unit < 1:
            raise NetworkArgsError(f"network_args unit={self.unit}: must be at least 1")


class DyLoRAModule(LowRankModule):
    """kohya's DyLoRA module: one ``(1, in[, kh, kw])`` down row and one ``(out, 1[, 1, 1])`` up column per rank.

    Separate parameters per rank are what make the untrained ranks of a step untouched: they get no
    gradient (``None``), so optimizers skip them entirely (no momentum, no weight decay), as in kohya.
    """

    LORAPLUS_PARAMS = (_UP,)

    def __init__(self, lora_name: str, original: nn.Module, rank: int, alpha: float | None, unit: int = 1, **kwargs):
        super().__init__(lora_name, original, rank, alpha, **kwargs)
        if rank % unit:
            raise NetworkArgsError(f"network_args unit={unit} does not divide the rank {rank} of {lora_name}")
        self.unit = unit
        self.trainable_rank: int | None = None  # b: first trainable rank of this step, drawn by sample_trainable_rank
        out_dim, *in_shape = original.weight.shape
        up_shape = (out_dim, 1, 1, 1) if self.is_conv else (out_dim, 1)
        for i in range(rank):
            down = torch.empty(1, *in_shape)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # fan-in of a row = fan-in of the whole factor
            self.register_parameter(f"{_DOWN}_{i}", nn.Parameter(down))
            self.register_parameter(f"{_UP}_{i}", nn.Parameter(torch.zeros(up_shape)))

    def _rows(self, factor: str) -> list[nn.Parameter]:
        return [self._parameters[f"{factor}_{i}"] for i in range(self.lora_dim)]

    def sample_trainable_rank(self) -> int:
        """Draw this step's ``b`` with Python's ``random``, as kohya does: ``set_seed`` seeds it, accelerate's
        ``save_state`` stores it (so a resume draws the same ranks), and every process draws the same."""
        rank = random.randint(0, self.lora_dim - 1)
        self.trainable_rank = rank - rank % self.unit
        return self.trainable_rank

    def _stacked(self, factor: str, dim: int) -> torch.Tensor:
        rows, first = self._rows(factor), self.trainable_rank
        if self.training and first is not None:
            rows = [row if first <= i < first + self.unit else row.detach() for i, row in enumerate(rows)]
        return torch.cat(rows, dim)

    def down_weight(self) -> torch.Tensor:
        return self._stacked(_DOWN, 0)

    def up_weight(self) -> torch.Tensor:
        return self._stacked(_UP, 1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.training and self.trainable_rank is None:  # a loop that never calls on_step_start
            self.sample_trainable_rank()
        return super().forward(x, *args, **kwargs)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        hidden = super()._down(x)
        if self.training:  # kohya's extra factor; cheapest on the rank-wide hidden state
            hidden = hidden * math.sqrt(self.lora_dim / (self.trainable_rank + self.unit))
        return hidden

    # The file holds kohya's stacked factors, not the per-rank parameters.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, buffer in self._buffers.items():
            if buffer is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = buffer if keep_vars else buffer.detach()
        for key, factor, dim in _FILE_KEYS:
            stacked = torch.cat(self._rows(factor), dim)
            destination[prefix + key] = stacked if keep_vars else stacked.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for key, factor, dim in _FILE_KEYS:
            stacked = state_dict.pop(prefix + key, None)
            if stacked is not None:
                state_dict.update({f"{prefix}{factor}_{i}": part for i, part in enumerate(stacked.split(1, dim))})
        start = len(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # Missing rows are reported by the file's key they come from.
        by_row = {f"{prefix}{factor}_": prefix + key for key, factor, _ in _FILE_KEYS}
        missing = [next((k for row, k in by_row.items() if key.startswith(row)), key) for key in missing_keys[start:]]
        missing_keys[start:] = list(dict.fromkeys(missing))


class DyLoRANetwork(LoRANetwork):
    """The network ``create_network`` builds, on LoRA's targets; draws every module's rank at each step."""

    def on_step_start(self, text_encoder=None, unet=None) -> None:
        for module in self.adapters:
            module.sample_trainable_rank()


def _as_dylora(shaped: LoRANetwork, unit: int) -> DyLoRANetwork:
    """``shaped``'s layers, ranks, alphas and args, each module made a DyLoRA module."""
    modules = [
        DyLoRAModule(
            m.lora_name, m.original, m.lora_dim, m.alpha.item(), unit=unit, multiplier=m.multiplier,
            dropout=m.dropout, rank_dropout=m.rank_dropout, module_dropout=m.module_dropout,
        )
        for m in shaped.adapters
    ]  # fmt: skip
    args = DyLoRAArgs(**dataclasses.asdict(shaped.args), unit=unit)
    return DyLoRANetwork(__name__, modules, args, shaped.dim, shaped.alpha, shaped.multiplier)


def _lora_args(network_args: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in network_args.items() if key != "unit"}


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | list[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **network_args: str,
) -> DyLoRANetwork:
    """A new DyLoRA network on LoRA's layers with LoRA's ranks; kohya's signature (``vae`` is unused).

    The layers and ranks are :mod:`networks.lora`'s, built by it (a transient LoRA network, as large as
    this one: simpler than a second copy of its rules).
    """
    args = parse_network_args(DyLoRAArgs, network_args)  # every key checked before anything is built
    dim = DEFAULT_DIM if network_dim is None else int(network_dim)
    for name, rank in (("network_dim", dim), ("conv_dim", args.conv_dim)):
        if rank is not None and rank % args.unit:
            raise NetworkArgsError(f"network_args unit={args.unit} does not divide {name} {rank}")
    shaped = create_lora_network(
        multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout, **_lora_args(network_args)
    )
    return _as_dylora(shaped, args.unit)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | list[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **network_args: str,
) -> tuple[Network, Mapping[str, torch.Tensor]]:
    """A network shaped like ``file`` (ranks and alphas per module); weights are not loaded (kohya).

    A DyLoRA file is a LoRA file: :mod:`networks.lora` reads it and checks its keys. ``for_inference``
    returns that plain LoRA network (what the file computes in eval mode, without per-rank parameters);
    otherwise ``unit`` (default 1) must divide every module's rank.
    """
    args = parse_network_args(DyLoRAArgs, network_args)
    shaped, weights_sd = create_lora_from_weights(
        multiplier, file, vae, text_encoder, unet, weights_sd, for_inference, **_lora_args(network_args)
    )
    return (shaped if for_inference else _as_dylora(shaped, args.unit)), weights_sd
