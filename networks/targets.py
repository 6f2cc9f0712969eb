"""Which layers a network adapts, and kohya's names for them.

Targets are found by the class name of their parent module (``Transformer2DModel``, ``ResnetBlock2D``,
``CLIPAttention``, ...), as kohya's ``networks/lora.py`` does, and named ``lora_unet_…``/``lora_te_…``
with every ``.`` of the module path turned into ``_``. Also the helpers the families share when they
build a network from a weights file: which targets the file names, and what its modules agree on.

Imports only torch and ``networks/`` siblings: kohya users copy network files into their own checkout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from networks.errors import NetworkError, NetworkWeightsError
from networks.network_args import MID_BLOCK, SD_BLOCKS, SDXL_BLOCKS, BlockLayout
from networks.sgm_names import unet_path_renamer

UNET_PREFIX, TEXT_ENCODER_PREFIX = "lora_unet", "lora_te"
# kohya's target parents, matched by class name anywhere in the class's MRO (subclasses match too).
UNET_TRANSFORMER_PARENTS = ("Transformer2DModel",)
UNET_CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
# transformers >= 5.6 dropped this level from CLIPTextModel; every file keeps it (kohya, A1111, diffusers).
TEXT_MODEL_LEVEL = "text_model"

_UP_DOWN_BLOCK = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


# kohya's SDXL blocks by the SGM name's first part: 0 time/label embedding, 1..9 input_blocks.N,
# 10..12 middle_block.N, 13..21 output_blocks.N, 22 out (kohya's get_block_index with is_sdxl).
_SDXL_BLOCK_STARTS = {"time_embed": 0, "label_emb": 0, "input_blocks": 1, "middle_block": 10, "output_blocks": 13}
_SDXL_BLOCK = re.compile(r"lora_unet_(time_embed|label_emb|input_blocks|middle_block|output_blocks)_(\d+)_")


def is_sdxl_name(lora_name: str) -> bool:
    """A UNet key with SDXL's SGM paths (kohya's test: ``input_blocks``/``output_blocks`` in the name)."""
    return lora_name.startswith(f"{UNET_PREFIX}_") and _SDXL_BLOCK.match(lora_name) is not None


def block_layout(lora_names: Iterable[str]) -> BlockLayout:
    """The block layout of a network's modules: SDXL's when a UNet key has SGM paths, SD1/2's otherwise."""
    return SDXL_BLOCKS if any(is_sdxl_name(name) for name in lora_names) else SD_BLOCKS


def block_index(lora_name: str) -> int:
    """kohya's block of a UNet key, -1 for none (text encoder).

    SD1/2: 1 + 3i + j for down block i, 12 for mid, 13 + 3i + j for up (samplers count as j = 2).
    SDXL (SGM names): 1 + N for input_blocks.N, 10 + N for middle_block.N, 13 + N for output_blocks.N.
    """
    sdxl = _SDXL_BLOCK.match(lora_name)
    if sdxl:
        start = _SDXL_BLOCK_STARTS[sdxl[1]]
        return start + int(sdxl[2]) if start else 0
    if lora_name.startswith(f"{UNET_PREFIX}_out_"):
        return SDXL_BLOCKS.count - 1
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


def is_3x3(module: nn.Module) -> bool:
    """A conv with a kernel larger than 1x1: kohya gives it ``conv_dim`` instead of ``network_dim``."""
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def layer_targets(text_encoder, unet, convs: bool) -> list[Target]:
    """kohya LoRA's targets: Linear and Conv2d layers in attention blocks, and with ``convs`` in ResNets
    and samplers (LoCon)."""
    parents = UNET_TRANSFORMER_PARENTS + (UNET_CONV_PARENTS if convs else ())
    return find_targets(text_encoder, unet, parents, lambda _, child: isinstance(child, (nn.Linear, nn.Conv2d)))


def targets_named_in(
    names: Collection[str], targets: Sequence[Target], source: str, what: str = "layer of this model"
) -> dict[str, Target]:
    """``{name: target}`` for the module ``names`` of a weights file, in the model's order.

    A name that fits no target, or a file without modules, raises a one-line error naming ``source``.
    """
    by_name = {target.name: target for target in targets}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise NetworkWeightsError(f"{len(unknown)} modules of '{source}' match no {what}, e.g. '{unknown[0]}'")
    if not names:
        raise NetworkWeightsError(f"'{source}' holds no network modules")
    return {name: target for name, target in by_name.items() if name in names}


def uniform(values: Iterable) -> int | float | str | None:
    """The single value of ``values``; ``"Dynamic"`` if they differ (kohya resize_lora's word); None if empty."""
    distinct = set(values)
    if len(distinct) > 1:
        return "Dynamic"
    return distinct.pop() if distinct else None
