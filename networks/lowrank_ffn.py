"""Narrow feed-forward layers that shrink the UNet, on kohya's ``--network_module`` protocol.

Each selected transformer feed-forward of SD1.x/2.x (``ff``: ``net.0.proj`` C -> 2*4C GEGLU, ``net.2``
4C -> C) is replaced by one with fewer hidden GEGLU units, k instead of 4C. The trainable weights are
the whole narrow FFN, so the network is a *replacement*, not a delta: it has no ``merge_to`` and
no ``--scale_weight_norms``.

* ``--network_args blocks=IN7,IN8,MID,OUT3,OUT4,OUT5`` (kohya's block names, ``IN07`` also
  accepted; ``all`` or nothing for all 16 FFNs) and ``hidden=960`` (k for every selected FFN)
  or ``ratio=0.1875`` (k = round(ratio * 4C) per FFN, so it scales with the stage); without
  either, ``--network_dim`` is k.
* Keys: kohya's module name of the FFN plus diffusers' ``FeedForward`` tensor names, e.g.
  ``lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_ff.net.0.proj.weight``, ``….net.2.bias``.
  So the tensors under one name *are* a diffusers ``FeedForward(inner_dim=k)`` state dict, and
  loaders that only know ``lora_down``/``lora_up`` refuse the file instead of misreading it.
* Metadata: ``lowrank_ffn_widths`` (json ``{module name: k}``) and ``lowrank_ffn_init`` (how the
  weights were initialised: ``weights``, ``pca`` or ``prune``), besides kohya's ``ss_*``.

``create_network`` can only initialise from the weights (it gets no data): it keeps the k units
with the largest weight-only score. The calibrated initialisations (``pca``, ``prune``), block-wise
training, the Theseus swap and the export to a compressed UNet live in ``library/ffn_compression``
and ``tools/compress_ffn.py``, which write files this module loads (``--network_weights``).

Imports only torch and ``networks/`` siblings: kohya users copy network files into their checkout.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from networks.base import (
    Network,
    NetworkModule,
    NetworkWeightsError,
    Target,
    block_layout,
    find_targets,
    targets_named_in,
    uniform,
    warn_ignored_args,
)
from networks.lora_file import load_lora_file
from networks.network_args import (
    MID_BLOCK,
    SD_BLOCKS,
    NetworkArgs,
    NetworkArgsError,
    NetworkError,
    parse_network_args,
)

FFN_PARENTS = ("BasicTransformerBlock",)
WIDTHS_METADATA, INIT_METADATA = "lowrank_ffn_widths", "lowrank_ffn_init"
FFN_TENSORS = ("net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias")
_BLOCK = re.compile(r"^(IN|OUT)(\d{1,2})$|^MID$")


# --------------------------------------------------------------------------------------------------
# Blocks and args
# --------------------------------------------------------------------------------------------------


def block_name(index: int) -> str:
    """kohya's name of a UNet block index: ``IN07``, ``MID``, ``OUT03``."""
    if index == MID_BLOCK:
        return "MID"
    return f"IN{index:02d}" if index < MID_BLOCK else f"OUT{index - MID_BLOCK - 1:02d}"


def block_number(name: str) -> int:
    """The block index of ``IN7``/``IN07``/``MID``/``OUT3`` (case-insensitive); ValueError otherwise."""
    match = _BLOCK.match(name.strip().upper())
    if not match or (match.group(2) is not None and int(match.group(2)) > 11):
        raise ValueError(f"'{name}' is not a block name (IN00..IN11, MID, OUT00..OUT11, or all)")
    if match.group(1) is None:
        return MID_BLOCK
    number = int(match.group(2))
    return number if match.group(1) == "IN" else MID_BLOCK + 1 + number


def parse_blocks(value) -> tuple[str, ...] | None:
    """``OUT3,IN7,MID`` -> ("IN07", "MID", "OUT03") (kohya's order); ``all`` -> None (every FFN)."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    items = [str(item).strip() for item in items if str(item).strip()]
    if [item.lower() for item in items] == ["all"]:
        return None
    if not items:
        raise ValueError("no block given")
    return tuple(block_name(number) for number in sorted({block_number(item) for item in items}))


@dataclass
class LowRankFFNArgs(NetworkArgs):
    """``--network_args`` of narrow FFNs: which blocks, and how narrow (``hidden`` or ``ratio``)."""

    blocks: tuple[str, ...] | None = field(default=None, metadata={"parse": parse_blocks})
    hidden: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden is not None and self.ratio is not None:
            raise NetworkArgsError("network_args hidden and ratio both set; give one")
        if self.hidden is not None and self.hidden < 1:
            raise NetworkArgsError(f"network_args hidden={self.hidden}: must be >= 1")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise NetworkArgsError(f"network_args ratio={self.ratio}: must be in (0, 1]")

    def width(self, target_name: str, full: int, network_dim: int | None) -> int:
        """The narrow width k of an FFN with ``full`` hidden units."""
        if self.hidden is not None:
            width, source = self.hidden, f"network_args hidden={self.hidden}"
        elif self.ratio is not None:
            width, source = max(1, round(self.ratio * full)), f"network_args ratio={self.ratio}"
        elif network_dim:
            width, source = int(network_dim), f"--network_dim {network_dim}"
        else:
            raise NetworkArgsError("give the narrow width: network_args hidden=N or ratio=R (or --network_dim N)")
        if width > full:
            raise NetworkArgsError(f"{source}: {target_name} has only {full} hidden units")
        return width


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)


class GEGLU(nn.Module):
    """diffusers' GEGLU layout: ``proj`` holds the value rows, then the gate rows; ``value * gelu(gate)``."""

    def __init__(self, dim: int, hidden: int, bias: bool, device=None):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Weights follow the activations' dtype (as LoRA modules do), so a float32 network runs on a
        # half-precision UNet without autocast.
        projected = F.linear(x, self.proj.weight.to(x.dtype), _cast(self.proj.bias, x.dtype))
        value, gate = projected.chunk(2, dim=-1)
        return value * F.gelu(gate)


def ffn_layers(name: str, ff: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """``(net.0.proj, net.2)`` of a diffusers GEGLU ``FeedForward``; NetworkError naming ``name`` otherwise."""
    net = getattr(ff, "net", None)
    try:
        geglu, out = net[0], net[2]
        proj = geglu.proj
    except (TypeError, IndexError, AttributeError):
        raise NetworkError(f"{name} is not a diffusers FeedForward (net.0.proj, net.2)") from None
    is_geglu = type(geglu).__name__ == "GEGLU" and isinstance(proj, nn.Linear) and isinstance(out, nn.Linear)
    if not is_geglu or proj.out_features != 2 * out.in_features:
        raise NetworkError(f"{name}: only GEGLU feed-forwards (SD1.x/2.x) can be narrowed, not {type(geglu).__name__}")
    return proj, out


class NarrowFFNModule(NetworkModule):
    """A narrow GEGLU FFN (``net.0.proj`` C -> 2k, ``net.2`` k -> C) that takes over an original FFN.

    It is also a Theseus unit (``library/training/theseus.py``): with ``use_successor`` false the original
    FFN runs. ``multiplier`` blends the two outputs (1: narrow only, 0: original only).
    """

    MERGEABLE = False

    def __init__(self, lora_name: str, original: nn.Module, hidden: int, multiplier: float = 1.0):
        super().__init__(lora_name, original, multiplier)
        proj, out = ffn_layers(lora_name, original)
        device = proj.weight.device  # the meta device for shape-only models
        self.full_width = out.in_features
        self.net = nn.ModuleList(
            [
                GEGLU(proj.in_features, hidden, proj.bias is not None, device),
                nn.Identity(),  # diffusers' dropout slot (p=0 in SD), kept so the keys match FeedForward
                nn.Linear(hidden, out.out_features, bias=out.bias is not None, device=device),
            ]
        )
        self.use_successor = True

    @property
    def hidden_width(self) -> int:
        return self.net[2].in_features

    def narrow(self, x: torch.Tensor) -> torch.Tensor:
        """The narrow FFN's output (the student)."""
        out = self.net[2]
        return F.linear(self.net[0](x), out.weight.to(x.dtype), _cast(out.bias, x.dtype))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The original FFN's output (the teacher), whether or not this module is applied."""
        return self.original_forward(x) if self.is_applied else self.original(x)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.use_successor or self.multiplier == 0:
            return self.reference(hidden_states)
        narrow = self.narrow(hidden_states)
        if self.multiplier == 1:
            return narrow
        return torch.lerp(self.reference(hidden_states), narrow, self.multiplier)

    @torch.no_grad()
    def set_units(
        self, units: Sequence[int] | torch.Tensor, out_weight: torch.Tensor | None = None, out_bias=None
    ) -> None:
        """Keep the original's hidden ``units`` (value row i, gate row 4C+i, ``net.2`` column i).

        ``out_weight`` (C x k) and ``out_bias`` replace the kept ``net.2`` columns and bias, for
        initialisations that fold the dropped units into the kept ones.
        """
        proj, out = ffn_layers(self.lora_name, self.original)
        units = torch.as_tensor(units, dtype=torch.long, device=proj.weight.device)
        if units.numel() != self.hidden_width:
            raise NetworkError(f"{self.lora_name}: {units.numel()} units given for {self.hidden_width} hidden units")
        rows = torch.cat([units, units + self.full_width])
        mine_proj, mine_out = self.net[0].proj, self.net[2]
        mine_proj.weight.copy_(proj.weight[rows])
        if proj.bias is not None:
            mine_proj.bias.copy_(proj.bias[rows])
        mine_out.weight.copy_(out.weight[:, units] if out_weight is None else out_weight)
        if out.bias is not None:
            mine_out.bias.copy_(out.bias if out_bias is None else out_bias)

    @torch.no_grad()
    def weight_scores(self) -> torch.Tensor:
        """Data-free importance of each original unit: ``|value row| * |gate row| * |net.2 column|``.

        For isotropic inputs (what LayerNorm roughly gives) the rms of unit i's output contribution
        scales with this product; calibration data gives better scores (``library/ffn_compression``).
        """
        proj, out = ffn_layers(self.lora_name, self.original)
        value, gate = proj.weight.float().split(self.full_width)
        return value.norm(dim=1) * gate.norm(dim=1) * out.weight.float().norm(dim=0)


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------


class LowRankFFNNetwork(Network):
    """Narrow FFNs for a UNet; ``init_method`` records how their weights were initialised."""

    init_method = "weights"

    @property
    def ffn_modules(self) -> list[NarrowFFNModule]:
        return [m for m in self.adapters if isinstance(m, NarrowFFNModule)]

    @property
    def widths(self) -> dict[str, int]:
        return {m.lora_name: m.hidden_width for m in self.ffn_modules}

    def network_metadata(self) -> dict[str, str]:
        widths = json.dumps(self.widths)
        return {**super().network_metadata(), WIDTHS_METADATA: widths, INIT_METADATA: self.init_method}

    def load_weights(self, file: str | os.PathLike | Mapping[str, torch.Tensor]):
        """Load a file or state dict; a file's ``lowrank_ffn_init`` carries over to this network."""
        if isinstance(file, (str, os.PathLike)):
            file, metadata = load_lora_file(file)
            self.init_method = metadata.get(INIT_METADATA, self.init_method)
        return super().load_weights(file)


def ffn_targets(unet: nn.Module | None) -> list[Target]:
    """Every transformer feed-forward of the UNet, with kohya's module name (``lora_unet_…_ff``)."""
    return find_targets(None, unet, FFN_PARENTS, lambda name, module: name == "ff")


def select_targets(unet: nn.Module | None, blocks: Sequence[str] | None) -> list[Target]:
    """The FFNs in ``blocks`` (kohya names; None: all); a named block without an FFN raises."""
    targets = ffn_targets(unet)
    if not targets:
        raise NetworkError("the UNet has no transformer feed-forward (BasicTransformerBlock.ff) to narrow")
    if blocks is None:
        return targets
    if block_layout(t.name for t in targets) is not SD_BLOCKS:
        # IN/MID/OUT names are SD1/2's 25 blocks; SDXL's kohya blocks are numbered otherwise.
        raise NetworkArgsError("network_args blocks: block names are SD1/2's; on SDXL leave blocks unset (all FFNs)")
    present = {block_name(t.block) for t in targets}
    missing = [b for b in blocks if b not in present]
    if missing:
        ordered = sorted(present, key=block_number)
        raise NetworkArgsError(
            f"network_args blocks: {', '.join(missing)} has no transformer feed-forward; blocks with one: "
            + ",".join(ordered)
        )
    return [t for t in targets if block_name(t.block) in blocks]


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | list[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **network_args: str,
) -> LowRankFFNNetwork:
    """Narrow FFNs for ``unet`` (kohya's signature; the text encoder, VAE and alpha are not used).

    The weights start from the original FFN's units with the largest :meth:`NarrowFFNModule.weight_scores`
    (at full width: the original FFN exactly).
    """
    args = parse_network_args(LowRankFFNArgs, network_args)
    if neuron_dropout:
        raise NetworkArgsError(f"--network_dropout {neuron_dropout}: narrow FFNs have no dropout; leave it unset")
    modules = []
    for target in select_targets(unet, args.blocks):
        full = ffn_layers(target.name, target.module)[1].in_features
        module = NarrowFFNModule(target.name, target.module, args.width(target.name, full, network_dim), multiplier)
        kept = module.weight_scores().topk(module.hidden_width).indices.sort().values
        module.set_units(kept)
        modules.append(module)
    return LowRankFFNNetwork(__name__, modules, args, uniform(m.hidden_width for m in modules), None, multiplier)


def widths_in_weights(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{module name: k}`` of a narrow-FFN state dict; a key of any other kind raises."""
    widths = {}
    for key, value in weights_sd.items():
        name, _, tensor = key.partition(".")
        if tensor not in FFN_TENSORS:
            raise NetworkWeightsError(
                f"'{key}' is not a narrow-FFN tensor (<name>.{', .'.join(FFN_TENSORS)}); "
                "is it a LoRA file? use its own --network_module"
            )
        if tensor == "net.2.weight":
            widths[name] = value.shape[1]
    missing = sorted({key.partition(".")[0] for key in weights_sd} - set(widths))
    if missing:
        raise NetworkWeightsError(f"'{missing[0]}' has no net.2.weight, so its width is unknown")
    return widths


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | list[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **network_args: str,
) -> tuple[LowRankFFNNetwork, Mapping[str, torch.Tensor]]:
    """A network shaped like ``file`` (its FFNs and widths); weights are not loaded (kohya's contract).

    ``blocks``/``hidden``/``ratio`` come from the file; given ones that differ are ignored with a warning.
    """
    metadata = {}
    if weights_sd is None:
        weights_sd, metadata = load_lora_file(file)
    widths = widths_in_weights(weights_sd)
    source = str(file or "the weights")
    targets = list(targets_named_in(widths, ffn_targets(unet), source, "FFN of this UNet").values())
    modules = [NarrowFFNModule(t.name, t.module, widths[t.name], multiplier) for t in targets]
    args = parse_network_args(LowRankFFNArgs, network_args)
    width = uniform(widths.values())
    blocks = tuple(block_name(number) for number in sorted({t.block for t in targets}))
    if block_layout(t.name for t in targets) is not SD_BLOCKS:
        blocks = None  # SDXL: no IN/MID/OUT names (see select_targets)
    built = {"blocks": blocks, "hidden": width if isinstance(width, int) else None, "ratio": None}
    warn_ignored_args(
        [k for k, v in built.items() if getattr(args, k) not in (None, v)], "blocks and widths come from the weights"
    )
    args = replace(args, **built)
    network = LowRankFFNNetwork(__name__, modules, args, width, None, multiplier)
    network.init_method = metadata.get(INIT_METADATA, network.init_method)
    return network, weights_sd
