"""The network ``--network_module`` names: imported as kohya does, created from kohya's network flags.

Any module with kohya's ``create_network``/``create_network_from_weights`` works (ours or LyCORIS);
``network_protocol`` adapts what it builds to the loop's contract.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from library.errors import ConfigError
from library.models.stable_diffusion import StableDiffusionModel
from library.training.args import parse_key_values
from library.training.network_protocol import TrainableNetwork, as_trainable_network
from networks.errors import NetworkError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def import_network_module(name: str):
    """Import ``--network_module`` with the repo root on sys.path (kohya's convention)."""
    if not name:
        raise ConfigError("--network_module is required (e.g. networks.lora)")
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"--network_module '{name}' cannot be imported: {err}") from err
    for function in ("create_network", "create_network_from_weights"):
        if not hasattr(module, function):
            raise ConfigError(f"--network_module '{name}' has no {function}(); it is not a network module")
    return module


@contextlib.contextmanager
def network_errors_as_config_errors(flag: str) -> Iterator[None]:
    """Our network modules raise ``networks.errors`` of their own (they cannot import library/); name the flag."""
    try:
        yield
    except NetworkError as err:  # LoRAFileError included
        raise ConfigError(f"{flag}: {err}") from err


def text_encoder_arg(model) -> torch.nn.Module | list[torch.nn.Module]:
    """What kohya hands networks as ``text_encoder``: the encoder (SD1/SD2) or the list of both (SDXL)."""
    encoders = getattr(model, "text_encoders", None)
    return list(encoders) if encoders else model.text_encoder


def create_network(args: argparse.Namespace, module, model: StableDiffusionModel) -> TrainableNetwork:
    """The network ``--network_module`` builds from kohya's network flags (not yet applied)."""
    with network_errors_as_config_errors("--network_args"):
        net_kwargs = parse_key_values(args.network_args, "--network_args")
        if args.dim_from_weights:
            if not args.network_weights:
                raise ConfigError("--dim_from_weights needs --network_weights")
            network, _ = module.create_network_from_weights(
                1, args.network_weights, model.vae, text_encoder_arg(model), model.unet, **net_kwargs
            )
        else:
            network = module.create_network(
                1.0, args.network_dim, args.network_alpha, model.vae, text_encoder_arg(model), model.unet,
                neuron_dropout=args.network_dropout, **net_kwargs,
            )  # fmt: skip
    if network is None:
        raise ConfigError(f"--network_module {args.network_module} built no network from these arguments")
    requested = {
        "ss_network_module": args.network_module,
        "ss_network_dim": str(args.network_dim),
        "ss_network_alpha": str(args.network_alpha),
        "ss_network_args": json.dumps(net_kwargs),  # kohya: the --network_args dict, values as given
    }
    return as_trainable_network(network, args.network_module, requested)


def load_network_weights(args: argparse.Namespace, network: TrainableNetwork) -> None:
    if args.network_weights:
        with network_errors_as_config_errors("--network_weights"):
            info = network.load_weights(args.network_weights)
        logger.info("loaded --network_weights %s: %s", args.network_weights, info)
