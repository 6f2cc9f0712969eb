"""LoRA and LoCon (C3Lier) for Stable Diffusion 1.x/2.x and SDXL, a drop-in for kohya's ``networks.lora``.

Same keys (``lora_unet_…``/``lora_te_…`` with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``),
same targets, same ``--network_args``, and files that kohya, A1111, ComfyUI and diffusers load.

Targets (SD1/2, and SDXL with kohya's SDXL names): Linear and 1x1 Conv layers inside the UNet's
``Transformer2DModel`` blocks and the text encoder's attention and MLP blocks; with ``conv_dim`` (or
``conv_block_dims``) also the layers of ``ResnetBlock2D``/``Downsample2D``/``Upsample2D``, where 3x3 convs
get ``conv_dim`` and the Linear ``time_emb_proj`` and 1x1 ``conv_shortcut`` get ``network_dim``.

``--network_args`` (see :class:`LoRAArgs`): ``conv_dim``, ``conv_alpha``, ``dropout``, ``rank_dropout``,
``module_dropout``, ``block_dims``, ``block_alphas``, ``conv_block_dims``, ``conv_block_alphas`` (SD1/2: 25
values, IN00..IN11, MID, OUT00..OUT11; SDXL: 23, time embedding, input_blocks 0..8, middle_block 0..2,
output_blocks 0..8, out), ``down_lr_weight``/``mid_lr_weight``/``up_lr_weight`` (SD1/2: 12/1/12 values,
SDXL: 9/3/9; numbers or ``cosine``/``sine``/``linear``/``reverse_linear``/``zeros`` with ``+offset``),
``block_lr_zero_threshold``,
``loraplus_lr_ratio``, ``loraplus_unet_lr_ratio``, ``loraplus_text_encoder_lr_ratio``. Unknown keys raise.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from networks.base import (
    TEXT_ENCODER_PARENTS,
    UNET_CONV_PARENTS,
    UNET_TRANSFORMER_PARENTS,
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
from networks.lora_file import load_lora_file
from networks.network_args import BlockLayout, LowRankArgs, NetworkArgsError, parse_network_args

DEFAULT_DIM, DEFAULT_ALPHA = 4, 1.0  # kohya's values when --network_dim / --network_alpha are not given
_BLOCK_LISTS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
_LORA_TENSORS = ("lora_down.weight", "lora_up.weight", "alpha")


@dataclass
class LoRAArgs(LowRankArgs):
    """kohya ``networks.lora``'s ``--network_args``, typed. Block lists have one value per UNet block
    (their length depends on the model: :meth:`check_block_lists`)."""

    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None

    def check_block_lists(self, layout: BlockLayout) -> None:
        """kohya asserts that each block list has one value per block of the model's layout."""
        for name in _BLOCK_LISTS:
            values = getattr(self, name)
            if values is not None and len(values) != layout.count:
                raise NetworkArgsError(
                    f"network_args {name}: {layout.count} values needed on {layout.name} ({layout.labels}), "
                    f"got {len(values)}"
                )

    @property
    def targets_convs(self) -> bool:
        return self.conv_dim is not None or self.conv_block_dims is not None

    @property
    def blockwise(self) -> bool:
        """Ranks per block: any block list or block lr weight given (kohya ignored lone block_alphas)."""
        return any(getattr(self, name) is not None for name in _BLOCK_LISTS) or self.has_block_lrs


class LoRAModule(LowRankModule):
    """kohya's LoRA module: ``lora_down`` (kaiming-uniform init) and ``lora_up`` (zeros), so it starts as a no-op."""

    def __init__(self, lora_name: str, original: nn.Module, rank: int, alpha: float | None, **kwargs):
        super().__init__(lora_name, original, rank, alpha, **kwargs)
        if isinstance(original, nn.Conv2d):
            geometry = {k: getattr(original, k) for k in ("kernel_size", "stride", "padding", "dilation")}
            self.lora_down = nn.Conv2d(original.in_channels, rank, bias=False, **geometry)
            self.lora_up = nn.Conv2d(rank, original.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(original.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, original.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def down_weight(self) -> torch.Tensor:
        return self.lora_down.weight

    def up_weight(self) -> torch.Tensor:
        return self.lora_up.weight


class LoRANetwork(Network):
    """The network ``create_network`` builds; kohya's target lists are here for tools that read them."""

    UNET_TARGET_REPLACE_MODULE = UNET_TRANSFORMER_PARENTS
    UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = UNET_CONV_PARENTS
    TEXT_ENCODER_TARGET_REPLACE_MODULE = TEXT_ENCODER_PARENTS


def _rank_and_alpha(
    target: Target, args: LoRAArgs, dim: int, alpha: float, lr_weights: list[float] | None
) -> tuple[int | None, float | None]:
    """kohya's rank for a layer: network_dim, conv_dim for 3x3 convs, or the block's entry in block mode."""
    conv = is_3x3(target.module)
    block = target.block
    if block < 0 or not args.blockwise:  # the text encoder has no blocks
        return (args.conv_dim, args.conv_alpha) if conv else (dim, alpha)
    if lr_weights is not None and lr_weights[block] == 0:
        return None, None  # kohya builds no module where the block's lr weight is 0
    if not conv:
        dims, alphas = args.block_dims, args.block_alphas
        return (dim if dims is None else dims[block]), (alpha if alphas is None else alphas[block])
    if args.conv_block_dims is None:  # kohya reads conv_block_alphas only with conv_block_dims
        return args.conv_dim, args.conv_alpha or 1.0
    alphas = args.conv_block_alphas
    return args.conv_block_dims[block], (args.conv_alpha or 1.0) if alphas is None else alphas[block]


def _module(target: Target, rank: int, alpha: float, multiplier: float, args: LoRAArgs) -> LoRAModule:
    dropouts = {"dropout": args.dropout, "rank_dropout": args.rank_dropout, "module_dropout": args.module_dropout}
    return LoRAModule(target.name, target.module, rank, alpha, multiplier=multiplier, **dropouts)


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | list[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **network_args: str,
) -> LoRANetwork:
    """A new LoRA network for ``text_encoder`` and ``unet``; kohya's signature (``vae`` is unused)."""
    args = parse_network_args(LoRAArgs, network_args).with_neuron_dropout(neuron_dropout)
    dim = DEFAULT_DIM if network_dim is None else int(network_dim)
    alpha = DEFAULT_ALPHA if network_alpha is None else float(network_alpha)
    targets = layer_targets(text_encoder, unet, args.targets_convs)
    layout = block_layout(t.name for t in targets)  # SD1/2's 25 blocks or SDXL's 23
    args.check_block_lists(layout)
    lr_weights = args.block_lr_weights(layout)
    modules = []
    for target in targets:
        rank, module_alpha = _rank_and_alpha(target, args, dim, alpha, lr_weights)
        if rank:
            modules.append(_module(target, rank, module_alpha, multiplier, args))
    return LoRANetwork(__name__, modules, args, dim, alpha, multiplier)


def _ranks_in_file(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """{module name: (rank, alpha)} of a kohya LoRA state dict; anything else in it raises."""
    for key in weights_sd:
        if key.partition(".")[2] not in _LORA_TENSORS:
            raise NetworkWeightsError(
                f"'{key}' is not a kohya LoRA tensor (<name>.lora_down.weight, .lora_up.weight, .alpha); "
                "LoHa, LoKr and DoRA files need their own network module"
            )
    ranks = {}
    for key, down in weights_sd.items():
        name, _, tensor = key.partition(".")
        if tensor != "lora_down.weight":
            continue
        if f"{name}.lora_up.weight" not in weights_sd:
            raise NetworkWeightsError(f"'{name}' has lora_down but no lora_up weight")
        alpha = weights_sd.get(f"{name}.alpha")
        ranks[name] = (down.shape[0], float(alpha) if alpha is not None else float(down.shape[0]))
    return ranks


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
    """A network shaped like ``file`` (ranks and alphas per module); weights are not loaded (kohya).

    Dims-related ``network_args`` are replaced by what the file holds (``ss_network_dim``/``alpha`` say
    ``Dynamic`` when modules differ); the others (dropouts, block lr weights, LoRA+) apply.
    ``for_inference`` changes nothing: modules drop nothing in eval mode.
    """
    if weights_sd is None:
        weights_sd = load_lora_file(file)[0]
    ranks = _ranks_in_file(weights_sd)
    args = parse_network_args(LoRAArgs, network_args)
    source = str(file or "the weights")
    targets = list(targets_named_in(ranks, layer_targets(text_encoder, unet, convs=True), source).values())
    modules = [_module(t, *ranks[t.name], multiplier, args) for t in targets]
    convs = [ranks[t.name] for t in targets if is_3x3(t.module)]
    others = [ranks[t.name] for t in targets if not is_3x3(t.module)]
    conv_dim, conv_alpha = uniform(rank for rank, _ in convs), uniform(alpha for _, alpha in convs)
    built = dict.fromkeys(_BLOCK_LISTS + ("conv_dim", "conv_alpha"))
    if isinstance(conv_dim, int) and isinstance(conv_alpha, float):  # per-module values have no arg to show in
        built |= {"conv_dim": conv_dim, "conv_alpha": conv_alpha}
    warn_ignored_args(
        [k for k, v in built.items() if getattr(args, k) not in (None, v)], "dims and alphas come from the weights"
    )
    args = dataclasses.replace(args, **built)
    dim, alpha = uniform(rank for rank, _ in others), uniform(alpha for _, alpha in others)
    return LoRANetwork(__name__, modules, args, dim, alpha, multiplier), weights_sd
