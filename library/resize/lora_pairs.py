"""Which tensors of a LoRA file form LoRA modules, in the formats kohya's resize_lora.py reads.

kohya (``lora_down``/``lora_up``), PEFT (``lora_A``/``lora_B``) and ControlLoRA (``down``/``up``)
pairs are found by kohya's rule: the "down" name is the last or second-to-last dotted part of a key.
A LyCORIS Tucker LoCon adds ``lora_mid``. LyCORIS module types whose update no plain LoRA of the
same file can reproduce exactly (LoHa, LoKr, DoRA, ...) are refused by name instead of being
copied through or resized into garbage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from networks.errors import LoRAFileError
from networks.svd import lora_matrices

DOWN_UP_NAMES = (("lora_down", "lora_up"), ("lora_A", "lora_B"), ("down", "up"))

# Key endings of LyCORIS modules that resize refuses, and why.
UNSUPPORTED_MODULES = {
    ".hada_w1_a": ("LoHa", "a Hadamard product of two LoRAs"),
    ".lokr_w1": ("LoKr", "a Kronecker product"),
    ".lokr_w1_a": ("LoKr", "a Kronecker product"),
    ".dora_scale": ("DoRA", "its magnitude vector depends on the base model's weights"),
    ".diff": ("LyCORIS full", "a dense weight difference"),
    ".a1.weight": ("GLoRA", "it also scales the base weights"),
}


@dataclass(frozen=True)
class LoRAPair:
    """The keys of one LoRA module; ``mid_key`` only for a LyCORIS Tucker LoCon."""

    name: str
    down_key: str
    up_key: str
    mid_key: str | None = None

    @property
    def alpha_key(self) -> str:
        return f"{self.name}.alpha"

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key the module owns in the file (alpha included, whether present or not)."""
        return tuple(k for k in (self.down_key, self.up_key, self.mid_key, self.alpha_key) if k)


def _pair_for(key: str) -> LoRAPair | None:
    parts = key.split(".")
    for down_name, up_name in DOWN_UP_NAMES:
        if len(parts) >= 3 and parts[-2] == down_name:
            name, suffix = ".".join(parts[:-2]), "." + parts[-1]
        elif len(parts) >= 2 and parts[-1] == down_name:
            name, suffix = ".".join(parts[:-1]), ""
        else:
            continue
        mid = f"{name}.lora_mid{suffix}" if down_name == "lora_down" else None
        return LoRAPair(name, key, f"{name}.{up_name}{suffix}", mid)
    return None


def _refuse_lycoris(state_dict: dict[str, torch.Tensor], source: str) -> None:
    for key in state_dict:
        for ending, (module_type, reason) in UNSUPPORTED_MODULES.items():
            if key.endswith(ending):
                module = key[: -len(ending)]
                raise LoRAFileError(
                    f"{source}: module '{module}' is a {module_type} module ({reason}); only LoRA, LoCon, LoHa and "
                    "LoKr modules are read, since no plain LoRA reproduces this one exactly"
                )


def _check_pair(pair: LoRAPair, state_dict: dict[str, torch.Tensor], source: str) -> None:
    if pair.up_key not in state_dict:
        raise LoRAFileError(f"{source}: '{pair.down_key}' has no matching '{pair.up_key}'")
    down = state_dict[pair.down_key]
    if pair.mid_key in state_dict:
        mid = state_dict[pair.mid_key]
        if mid.dim() != 4 or mid.shape[1] != down.shape[0]:
            raise LoRAFileError(
                f"{source}: module '{pair.name}': lora_mid {tuple(mid.shape)} does not fit its lora_down"
            )
        down = torch.empty(mid.shape[0], down.shape[1], *mid.shape[2:], device="meta")
    try:
        lora_matrices(state_dict[pair.up_key], down)
    except ValueError as err:
        raise LoRAFileError(f"{source}: module '{pair.name}': {err}") from err
    alpha = state_dict.get(pair.alpha_key)
    if alpha is not None and alpha.numel() != 1:
        raise LoRAFileError(f"{source}: '{pair.alpha_key}' has shape {tuple(alpha.shape)}, expected a scalar")


def find_lora_pairs(state_dict: dict[str, torch.Tensor], source: str) -> list[LoRAPair]:
    """The LoRA modules of ``state_dict`` in file order; :class:`LoRAFileError` naming ``source`` if it is no LoRA."""
    _refuse_lycoris(state_dict, source)
    pairs = [pair for pair in map(_pair_for, state_dict) if pair is not None]
    for pair in pairs:
        _check_pair(pair, state_dict, source)
    if not pairs:
        raise LoRAFileError(
            f"{source}: no LoRA modules found (no lora_down/lora_up, lora_A/lora_B or down/up pairs): not a LoRA file"
        )
    return pairs
