"""Typed ``--network_args``: each network family declares a dataclass, parsed once from kohya's strings.

kohya passes ``--network_args key=value`` as strings and lets each network re-parse them (unknown keys are
ignored, ``"False"`` is truthy in places). Here a family subclasses :class:`NetworkArgs` (or
:class:`LowRankArgs`) with typed fields; :func:`parse_network_args` rejects unknown keys (listing the valid
ones) and bad values with one-line :class:`NetworkArgsError` errors, and :meth:`NetworkArgs.to_metadata`
writes the args as built back into ``ss_network_args``.

Imports nothing outside the standard library and ``networks.errors``: kohya users copy ``networks/`` files
into their checkout.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from networks.errors import NetworkArgsError, NetworkError  # noqa: F401  (NetworkError: its old home)

LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


@dataclass(frozen=True)
class BlockLayout:
    """kohya's UNet blocks for block-wise dims, alphas and lr weights, which differ between SD1/2 and SDXL.

    Block lists have :attr:`count` entries: ``down`` input blocks, ``mid`` middle ones, ``up`` output ones,
    and on SDXL (``ends``) one before (time/label embedding) and one after (``out``) that hold no adapted layer.
    """

    name: str
    down: int
    mid: int
    up: int
    ends: bool
    labels: str

    @property
    def count(self) -> int:
        return self.down + self.mid + self.up + (2 if self.ends else 0)


SD_BLOCKS = BlockLayout("SD1/2", 12, 1, 12, False, "IN00..IN11, MID, OUT00..OUT11")
SDXL_BLOCKS = BlockLayout(
    "SDXL", 9, 3, 9, True, "time embedding, input_blocks 0..8, middle_block 0..2, output_blocks 0..8, out"
)
NUM_BLOCKS = SD_BLOCKS.count  # 25
MID_BLOCK = 12  # SD1/2's MID block index
_MAX_DOWN_UP, _MAX_MID = max(SD_BLOCKS.down, SDXL_BLOCKS.down), max(SD_BLOCKS.mid, SDXL_BLOCKS.mid)


ArgsT = TypeVar("ArgsT", bound="NetworkArgs")


def _split(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [part.strip() for part in str(value).split(",")]


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        return _parse_bool(value)
    if isinstance(value, bool):
        raise ValueError(f"expected {kind.__name__}, got a boolean")
    if kind is int and isinstance(value, float):
        raise ValueError("expected an integer")
    return kind(value.strip() if isinstance(value, str) else value)


def _parser_for(annotation: Any) -> Callable[[Any], Any]:
    """A parser from kohya's string values to ``annotation`` (``X | None``, ``tuple[X, ...]`` or a scalar)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _parser_for(next(a for a in args if a is not type(None)))
    if origin is tuple:
        return lambda value: tuple(_parse_scalar(args[0], item) for item in _split(value))
    return lambda value: _parse_scalar(annotation, value)


def _is_unset(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("", "none", "null")


def parse_network_args(args_type: type[ArgsT], raw: Mapping[str, Any]) -> ArgsT:
    """kohya's ``key=value`` strings as a typed ``args_type``; unknown keys and bad values raise.

    ``None`` values are skipped, whatever the key: kohya's ``train_network.py`` injects ``dropout=None``
    into every network's args.
    """
    raw = {key: value for key, value in raw.items() if value is not None}
    fields = {f.name: f for f in dataclasses.fields(args_type) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise NetworkArgsError(f"unknown network_args {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(args_type)
    values = {}
    for key, value in raw.items():
        if _is_unset(value):
            continue
        parse = fields[key].metadata.get("parse") or _parser_for(hints[key])
        try:
            values[key] = parse(value)
        except (TypeError, ValueError) as err:
            raise NetworkArgsError(f"network_args {key}={value!r}: {err}") from None
    return args_type(**values)


def _render(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_render(item) for item in value)
    return str(value)


def _lr_weight_preset(name: str, count: int) -> list[float]:
    ramp = [i / (count - 1) for i in range(count)]
    curves = {
        "sine": [math.sin(math.pi / 2 * r) for r in ramp],
        "cosine": [math.sin(math.pi / 2 * r) for r in reversed(ramp)],
        "linear": ramp,
        "reverse_linear": ramp[::-1],
        "zeros": [0.0] * count,
    }
    return curves[name]


def _parse_list(value: Any, count: int) -> tuple[float, ...]:
    """kohya's lr-weight lists as given: empty items are 0 (padding with 1s waits for the block layout)."""
    weights = tuple(float(item) if item != "" else 0.0 for item in _split(value))
    if len(weights) > count:
        raise ValueError(f"{len(weights)} values given, at most {count}")
    return weights


def _parse_preset(value: str) -> tuple[str, float]:
    name, _, offset = value.strip().partition("+")
    if name not in LR_WEIGHT_PRESETS:
        raise ValueError(f"use comma-separated numbers or a preset: {', '.join(LR_WEIGHT_PRESETS)} (+offset)")
    return name, float(offset or 0.0)


def _parse_down_up(value: Any) -> tuple[float, ...] | str:
    """A down/up lr-weight arg as given: numbers (at most the largest layout's count) or a checked preset."""
    if not isinstance(value, str) or "," in value:
        return _parse_list(value, _MAX_DOWN_UP)
    _parse_preset(value)
    return value.strip()


def _parse_mid(value: Any) -> tuple[float, ...]:
    return _parse_list(value, _MAX_MID)  # kohya splits mid_lr_weight on commas always: no presets


def parse_lr_weights(value: Any, count: int = SD_BLOCKS.down) -> tuple[float, ...]:
    """``count`` lr weights for the down or up blocks (kohya): comma-separated numbers, missing trailing
    ones 1, or ``preset[+offset]``, a curve over ``count`` blocks."""
    if not isinstance(value, str) or "," in value:
        weights = _parse_list(value, count)
        return weights + (1.0,) * (count - len(weights))
    name, offset = _parse_preset(value)
    return tuple(w + offset for w in _lr_weight_preset(name, count))


def _positive_or_none(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise NetworkArgsError(f"network_args {name}={value}: must be positive")


@dataclass
class NetworkArgs:
    """The ``--network_args`` the base acts on (block-wise lr weights, LoRA+); families subclass it."""

    # As given (numbers or a preset); their length depends on the model: see block_lr_weights.
    down_lr_weight: tuple[float, ...] | str | None = field(default=None, metadata={"parse": _parse_down_up})
    mid_lr_weight: tuple[float, ...] | None = field(default=None, metadata={"parse": _parse_mid})
    up_lr_weight: tuple[float, ...] | str | None = field(default=None, metadata={"parse": _parse_down_up})
    block_lr_zero_threshold: float = 0.0
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None

    def __post_init__(self) -> None:
        for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            _positive_or_none(name, getattr(self, name))

    @property
    def has_block_lrs(self) -> bool:
        return any(w is not None for w in (self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight))

    def block_lr_weights(self, layout: BlockLayout = SD_BLOCKS) -> list[float] | None:
        """One lr weight per block of ``layout`` (index = ``networks.targets.block_index``), or None without
        block-wise lrs. kohya: lists shorter than the layout's are filled with 1, weights at or under
        ``block_lr_zero_threshold`` are 0, SDXL's first and last blocks get 1; longer lists raise here."""
        if not self.has_block_lrs:
            return None
        result = []
        counts = {"down_lr_weight": layout.down, "mid_lr_weight": layout.mid, "up_lr_weight": layout.up}
        for name, count in counts.items():
            value = getattr(self, name)
            if value is None:
                result += [1.0] * count
                continue
            try:
                weights = parse_lr_weights(value, count)  # mid is always a tuple: never read as a preset
            except ValueError as err:
                raise NetworkArgsError(f"network_args {name} on {layout.name}: {err}") from None
            result += [w if w > self.block_lr_zero_threshold else 0.0 for w in weights]
        return [1.0, *result, 1.0] if layout.ends else result

    def to_metadata(self) -> dict[str, str]:
        """The args that differ from their defaults, as strings that :func:`parse_network_args` reads back."""
        return {
            f.name: _render(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        }


@dataclass
class LowRankArgs(NetworkArgs):
    """Args of up/down factorised families: 3x3 conv rank and kohya's three dropouts."""

    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None  # = --network_dropout (train_network.py injects it as a network_arg)
    rank_dropout: float | None = None
    module_dropout: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.conv_dim is not None and self.conv_dim < 0:
            raise NetworkArgsError(f"network_args conv_dim={self.conv_dim}: must be >= 0")
        if self.conv_dim == 0:
            self.conv_dim = None  # kohya: rank 0 means no module
        if self.conv_dim is not None and self.conv_alpha is None:
            self.conv_alpha = 1.0  # kohya's default
        for name in ("dropout", "rank_dropout", "module_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise NetworkArgsError(f"network_args {name}={p}: must be in [0, 1)")

    def with_neuron_dropout(self, neuron_dropout: float | None) -> LowRankArgs:
        """Merge ``create_network``'s ``neuron_dropout`` with the ``dropout`` network_arg (they are one setting)."""
        if neuron_dropout is None or neuron_dropout == self.dropout:
            return self
        if self.dropout is not None:
            raise NetworkArgsError(
                f"network_args dropout={self.dropout} contradicts --network_dropout {neuron_dropout}; give one"
            )
        return dataclasses.replace(self, dropout=float(neuron_dropout))
