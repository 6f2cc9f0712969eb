"""Light LoRA (HyperDreamBooth's Lightweight DreamBooth) for SD 1.x/2.x, as a kohya ``--network_module``.

Each LoRA factor is factored once more through a frozen random basis (kohya orientation)::

    lora_down = D_train (r x a) @ D_aux (a x in·k·k)     lora_up = U_aux (out x b) @ U_train (b x r)

so only ``r·(a + b)`` numbers per layer train, whatever the layer's width (``init=joint`` trains one
``b x a`` core instead: ``U_aux @ C @ D_aux``, split by SVD at export). Targets, key names, dropouts,
block lr weights and LoRA+ are those of :mod:`networks.lora`.

``--network_args``: ``aux_down`` (a, default 100) and ``aux_up`` (b, 50), clamped per layer to its fan-in
and width; ``aux_seed`` (0); ``init`` = ``up_zero`` | ``down_zero`` | ``joint``; ``save_compact``; and
LoRA's ``conv_dim``, ``conv_alpha``, ``dropout``, ``rank_dropout``, ``module_dropout``, lr weights, LoRA+.

Aux bases are a pure function of (aux_seed, module name, layer shape), made on the CPU without touching
the global RNG (see :mod:`networks.lilora_file`); so are the trainable cores' initial values.

Files: the *standard* form (default) multiplies the factors out into plain kohya ``lora_down``/``lora_up``/
``alpha`` keys that every consumer loads. The *compact* form (``save_compact=true`` or an output name
``*.lilora.safetensors``) holds only the cores, plus the seed, layer shapes and a fingerprint of the aux
bases in metadata; loading regenerates the aux and refuses a fingerprint mismatch.
``python networks/lilora.py --to_lora IN OUT`` converts compact to standard.

Resuming (``--network_weights``): a compact file restores its cores exactly. A standard file is projected
onto this network's aux bases (``D_train = lora_down @ D_aux^T``), which recovers the cores exactly when
its factors lie in those bases (any file this module saved with the same aux, also after an SVD resize);
anything else (a plain LoRA, another seed) is refused: it cannot be represented without changing it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python networks/lilora.py`: import `networks` from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from torch import nn

from networks.base import (
    LowRankModule,
    Network,
    NetworkWeightsError,
    Target,
    block_layout,
    is_3x3,
    layer_targets,
    targets_named_in,
    uniform,
    warn_ignored_args,
)
from networks.lilora_file import (
    ALGORITHM_KEY,
    AUX_ALGORITHM,
    AUX_KEYS,
    FINGERPRINT_KEY,
    FORMAT_KEY,
    INIT_KEY,
    LAYERS_KEY,
    aux_digest,
    aux_matrices,
    aux_settings,
    bake,
    check_fingerprint,
    compact_layers,
    compact_settings,
    compact_to_standard,
    fingerprint,
    is_compact,
    is_compact_name,
    layer_dims,
    pack,
    project,
    stable_seed,
    unpack,
)
from networks.lora import create_network_from_weights as create_lora_from_weights  # ours or kohya's: same call
from networks.lora_file import LoRAFileError, load_lora_file, save_lora_file
from networks.network_args import LowRankArgs, NetworkArgsError, NetworkError, parse_network_args

logger = logging.getLogger(__name__)

MODULE_NAME = "networks.lilora"
DEFAULT_DIM, DEFAULT_ALPHA = 4, 1.0  # kohya's values when --network_dim / --network_alpha are not given
INITS = ("up_zero", "down_zero", "joint")


@dataclass
class LiLoRAArgs(LowRankArgs):
    """``--network_args`` of Light LoRA; LoRA's low-rank args apply as they do there."""

    aux_down: int = 100
    aux_up: int = 50
    aux_seed: int = 0
    init: str = "up_zero"
    save_compact: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("aux_down", "aux_up"):
            if getattr(self, name) < 1:
                raise NetworkArgsError(f"network_args {name}={getattr(self, name)}: must be >= 1")
        if not 0 <= self.aux_seed < 2**63:
            raise NetworkArgsError(f"network_args aux_seed={self.aux_seed}: must be in [0, 2**63)")
        if self.init in ("both_zero", "zero", "zeros"):
            raise NetworkArgsError(
                f"network_args init={self.init} cannot train: the gradient of each trainable factor is a product "
                "with the other, so two zero factors stay zero; use up_zero, down_zero or joint"
            )
        if self.init not in INITS:
            raise NetworkArgsError(f"network_args init={self.init}: use one of {', '.join(INITS)}")
        if self.init == "joint" and self.rank_dropout:
            raise NetworkArgsError("network_args rank_dropout: init=joint has no rank channels until export")
        loraplus = (self.loraplus_lr_ratio, self.loraplus_unet_lr_ratio, self.loraplus_text_encoder_lr_ratio)
        if self.init == "joint" and any(loraplus):
            raise NetworkArgsError("network_args loraplus_*: init=joint trains one core, there is no up factor")


# --------------------------------------------------------------------------------------------------
# Module and network
# --------------------------------------------------------------------------------------------------


class LiLoRAModule(LowRankModule):
    """A LoRA whose factors live in frozen random bases: ``lilora_down``/``lilora_up`` (or ``lilora_core``) train."""

    LORAPLUS_PARAMS = ("lilora_up",)

    def __init__(self, lora_name: str, original: nn.Module, rank: int, alpha: float | None, *, aux_down: int = 100,
                 aux_up: int = 50, aux_seed: int = 0, init: str = "up_zero", **dropouts: float | None):  # fmt: skip
        super().__init__(lora_name, original, rank, alpha, **dropouts)
        self.init = init
        down_aux, up_aux = aux_matrices(aux_seed, lora_name, original.weight.shape, aux_down, aux_up)
        self.digest = aux_digest(lora_name, down_aux, up_aux)
        self.register_buffer("down_aux", down_aux, persistent=False)
        self.register_buffer("up_aux", up_aux, persistent=False)
        a, b = self.aux_dims
        if init == "joint":
            self.lilora_core = nn.Parameter(torch.zeros(b, a))
            return
        self.lilora_down, self.lilora_up = nn.Parameter(torch.zeros(rank, a)), nn.Parameter(torch.zeros(b, rank))
        # kohya's kaiming-uniform bound along the aux side: lora_down's rows (or lora_up's columns) get the norm
        # a kohya LoRA's lora_down rows have, so learning rates carry over.
        trained, width = (self.lilora_down, a) if init == "up_zero" else (self.lilora_up, b)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(stable_seed(aux_seed, lora_name, "init"))
            trained.uniform_(-(width**-0.5), width**-0.5, generator=generator)

    @property
    def aux_dims(self) -> tuple[int, int]:
        """(a, b) after clamping to the layer."""
        return self.down_aux.shape[0], self.up_aux.shape[1]

    def down_weight(self) -> torch.Tensor:
        inner = self.lilora_core if self.init == "joint" else self.lilora_down
        weight = inner @ self.down_aux.to(inner.dtype)
        return weight.view(weight.shape[0], *self.original.weight.shape[1:])

    def up_weight(self) -> torch.Tensor:
        weight = self.up_aux if self.init == "joint" else self.up_aux.to(self.lilora_up.dtype) @ self.lilora_up
        return weight.view(*weight.shape, 1, 1) if self.is_conv else weight

    def cores(self) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in self.named_parameters(recurse=False)}

    @torch.no_grad()
    def scale_delta_(self, ratio: float) -> None:
        if self.init == "joint":
            self.lilora_core.mul_(ratio)
        else:
            super().scale_delta_(ratio)

    def standard_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kohya (lora_down, lora_up) this module saves as."""
        return bake(self.cores(), self.down_aux, self.up_aux, self.lora_dim, self.original.weight.shape)

    def state_from_cores(self, cores: Mapping[str, torch.Tensor], alpha: float | torch.Tensor, source: str) -> dict:
        """This module's state dict from a file's cores (a two-factor pair also makes a joint core)."""
        if self.init == "joint":
            core = cores.get("lilora_core")
            cores = {"lilora_core": cores["lilora_up"] @ cores["lilora_down"] if core is None else core}
        elif "lilora_core" in cores:
            raise NetworkWeightsError(f"'{source}' was trained with init=joint; build this network with init=joint")
        return {f"{self.lora_name}.{key}": value for key, value in cores.items()} | {
            f"{self.lora_name}.alpha": torch.tensor(float(alpha))
        }


class LiLoRANetwork(Network):
    """A Light LoRA network: saves standard or compact files, loads either (see the module docstring)."""

    def fingerprint(self) -> str:
        return fingerprint({module.lora_name: module.digest for module in self.adapters})

    def network_metadata(self) -> dict[str, str]:
        aux = {key: str(getattr(self.args, arg)) for arg, key in AUX_KEYS.items()}
        extra = {INIT_KEY: self.args.init, ALGORITHM_KEY: AUX_ALGORITHM, FINGERPRINT_KEY: self.fingerprint()}
        return {**super().network_metadata(), **aux, **extra}

    def state_dict_for_file(self) -> dict[str, torch.Tensor]:
        """The standard form: a plain rank-r kohya LoRA."""
        tensors = {}
        for module in self.adapters:
            down, up = module.standard_factors()
            tensors |= {f"{module.lora_name}.lora_down.weight": down, f"{module.lora_name}.lora_up.weight": up}
            tensors[f"{module.lora_name}.alpha"] = module.alpha
        return tensors

    def compact_state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
        """The cores (one tensor per module: the safetensors header is a fifth of a compact file otherwise) and
        ``{name: [rank, alpha, layer shape]}`` for the metadata."""
        tensors, layers = {}, {}
        for module in self.adapters:
            key, value = pack(module.cores())
            tensors[f"{module.lora_name}.{key}"] = value
            layers[module.lora_name] = [module.lora_dim, module.alpha.item(), list(module.original.weight.shape)]
        return tensors, layers

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: dict | None) -> dict:
        """Write the standard form, or the compact one for ``save_compact`` or a ``*.lilora.safetensors`` name."""
        compact = self.args.save_compact or is_compact_name(file)
        metadata = {**(metadata or {}), **self.network_metadata(), FORMAT_KEY: "compact" if compact else "standard"}
        if not compact:
            return save_lora_file(file, self.state_dict_for_file(), metadata, dtype)
        if Path(file).suffix != ".safetensors":
            raise NetworkError(f"cannot save '{file}' in compact form: it needs safetensors metadata (seed, shapes)")
        tensors, layers = self.compact_state_dict()
        return save_lora_file(
            file, tensors, {**metadata, LAYERS_KEY: json.dumps(layers, separators=(",", ":"))}, dtype
        )

    def load_weights(self, file: str | os.PathLike | Mapping[str, torch.Tensor]):
        """Load a compact or standard file (or a state dict of this network's keys) into the cores."""
        if isinstance(file, (str, os.PathLike)):
            weights, metadata = load_lora_file(file)
            return super().load_weights(self.module_state(weights, metadata, str(file)))
        return super().load_weights(self.module_state(file))

    def module_state(self, weights: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                     source: str = "the weights") -> dict[str, torch.Tensor]:  # fmt: skip
        """``weights`` in this network's state-dict keys: compact cores unpacked after their aux fingerprint is
        checked, standard factors projected onto the aux bases; keys of modules it lacks are passed on as
        they are (the base ignores a part this network does not train and refuses the rest)."""
        modules = {module.lora_name: module for module in self.adapters}
        if is_compact(weights):
            return self._from_compact(weights, metadata or {}, modules, source)
        state = dict(weights)
        for key in [k for k in weights if k.endswith(".lora_down.weight")]:
            name = key.removesuffix(".lora_down.weight")
            if name in modules:
                down, up = state.pop(key), state.pop(f"{name}.lora_up.weight", None)
                if up is None:
                    raise NetworkWeightsError(f"'{name}' of '{source}' has lora_down but no lora_up weight")
                alpha = state.pop(f"{name}.alpha", torch.tensor(float(down.shape[0])))
                module = modules[name]
                cores = project(down, up, module.down_aux, module.up_aux, name, source)
                state |= module.state_from_cores(cores, alpha, source)
        return state

    def _from_compact(self, weights, metadata, modules, source) -> dict[str, torch.Tensor]:
        settings = compact_settings(metadata, source)
        for arg, key in AUX_KEYS.items():
            if int(settings[arg]) != getattr(self.args, arg):
                raise NetworkWeightsError(
                    f"'{source}' was trained with {arg}={settings[arg]} ({key}), this network has "
                    f"{arg}={getattr(self.args, arg)}: build it with --network_args {arg}={settings[arg]}"
                )
        state, digests = {}, {}
        for name, (_, alpha, shape) in compact_layers(metadata, source).items():
            module = modules.get(name)
            if module is None:
                digests[name] = aux_digest(
                    name, *aux_matrices(self.args.aux_seed, name, shape, self.args.aux_down, self.args.aux_up)
                )
                state |= {k: v for k, v in weights.items() if k.partition(".")[0] == name}
                continue
            if layer_dims(shape) != layer_dims(module.original.weight.shape):
                raise NetworkWeightsError(
                    f"'{name}' of '{source}' was trained on a layer of shape {tuple(shape)}, this model's is "
                    f"{tuple(module.original.weight.shape)}"
                )
            digests[name] = module.digest
            state |= module.state_from_cores(unpack(weights, name, *module.aux_dims, source), alpha, source)
        check_fingerprint(metadata, digests, source)
        return state


# --------------------------------------------------------------------------------------------------
# kohya's entry points
# --------------------------------------------------------------------------------------------------


def _module(target: Target, rank: int, alpha: float, multiplier: float, args: LiLoRAArgs) -> LiLoRAModule:
    return LiLoRAModule(
        target.name, target.module, rank, alpha, multiplier=multiplier, aux_down=args.aux_down, aux_up=args.aux_up,
        aux_seed=args.aux_seed, init=args.init, dropout=args.dropout, rank_dropout=args.rank_dropout,
        module_dropout=args.module_dropout,
    )  # fmt: skip


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | list[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **network_args: str,
) -> LiLoRANetwork:
    """A new Light LoRA network on LoRA's target layers; kohya's signature (``vae`` is unused)."""
    args = parse_network_args(LiLoRAArgs, network_args).with_neuron_dropout(neuron_dropout)
    dim = DEFAULT_DIM if network_dim is None else int(network_dim)
    alpha = DEFAULT_ALPHA if network_alpha is None else float(network_alpha)
    targets = layer_targets(text_encoder, unet, args.conv_dim is not None)
    lr_weights = args.block_lr_weights(block_layout(t.name for t in targets))  # SD1/2's or SDXL's blocks
    modules = []
    for target in targets:
        if lr_weights is not None and target.block >= 0 and lr_weights[target.block] == 0:
            continue  # kohya builds no module where the block's lr weight is 0
        rank, module_alpha = (args.conv_dim, args.conv_alpha) if is_3x3(target.module) else (dim, alpha)
        modules.append(_module(target, rank, module_alpha, multiplier, args))
    clamped = [m.lora_name for m in modules if m.aux_dims != (args.aux_down, args.aux_up)]
    if clamped:
        logger.info(
            f"aux_down/aux_up clamped to the layer's fan-in/width on {len(clamped)} modules, e.g. {clamped[0]}"
        )
    return LiLoRANetwork(MODULE_NAME, modules, args, dim, alpha, multiplier)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | list[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **network_args: str,
) -> tuple[Network, dict[str, torch.Tensor]]:
    """A network shaped like ``file`` and its weights in that network's keys (kohya's contract).

    Ranks, alphas and aux settings come from the file. ``for_inference`` returns a plain
    :mod:`networks.lora` network with the standard weights: at inference a Light LoRA is a LoRA. A compact
    file needs its metadata: pass ``file``, not only ``weights_sd``.
    """
    metadata = {}
    if weights_sd is None:
        weights_sd, metadata = load_lora_file(file)
    source, compact = str(file or "the weights"), is_compact(weights_sd)
    if for_inference:
        standard = compact_to_standard(weights_sd, metadata, source)[0] if compact else weights_sd
        return create_lora_from_weights(multiplier, None, vae, text_encoder, unet, weights_sd=standard)
    from_file = compact_settings(metadata, source) if compact else aux_settings(metadata)
    ignored = [arg for arg, value in from_file.items() if arg in network_args and str(network_args[arg]) != value]
    warn_ignored_args(ignored, f"the aux settings come from '{source}'")
    args = parse_network_args(LiLoRAArgs, {**network_args, **from_file})
    if compact:
        ranks = {name: (rank, alpha) for name, (rank, alpha, _) in compact_layers(metadata, source).items()}
    else:
        downs = {
            k.removesuffix(".lora_down.weight"): v for k, v in weights_sd.items() if k.endswith("lora_down.weight")
        }
        alphas = {name: weights_sd.get(f"{name}.alpha", torch.tensor(float(v.shape[0]))) for name, v in downs.items()}
        ranks = {name: (down.shape[0], float(alphas[name])) for name, down in downs.items()}
    by_name = targets_named_in(ranks, layer_targets(text_encoder, unet, convs=True), source)
    modules = [_module(by_name[name], rank, alpha, multiplier, args) for name, (rank, alpha) in ranks.items()]
    convs = [ranks[m.lora_name] for m in modules if is_3x3(m.original)]
    others = [ranks[m.lora_name] for m in modules if not is_3x3(m.original)]
    conv_dim, conv_alpha = uniform(rank for rank, _ in convs), uniform(alpha for _, alpha in convs)
    if not (isinstance(conv_dim, int) and isinstance(conv_alpha, float)):  # per-module values have no arg
        conv_dim = conv_alpha = None
    args = replace(args, conv_dim=conv_dim, conv_alpha=conv_alpha)
    dim, alpha = uniform(rank for rank, _ in others), uniform(alpha for _, alpha in others)
    network = LiLoRANetwork(MODULE_NAME, modules, args, dim, alpha, multiplier)
    return network, network.module_state(weights_sd, metadata, source)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a compact Light LoRA file into a standard kohya LoRA file.")
    parser.add_argument("--to_lora", nargs=2, metavar=("IN", "OUT"), required=True)
    source, target = parser.parse_args(argv).to_lora
    try:
        tensors, metadata = load_lora_file(source)
        if not is_compact(tensors):
            raise NetworkWeightsError(f"'{source}' holds no Light LoRA cores: it is already a standard file")
        save_lora_file(target, *compact_to_standard(tensors, metadata, source))
    except (NetworkError, LoRAFileError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
