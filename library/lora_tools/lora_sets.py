"""Reading the LoRA files a merge combines: modules as 2-D factors with their scale, checked against each other.

Every merge tool (``merge_lora.py``, ``svd_merge_lora.py``) starts here, so the input checks are
the same everywhere and all happen before anything heavy is loaded or written: one ratio per
file, one model family, and a module that appears in several files has the same layer shape in
each (a LoRA trained on SD1 and one trained on SD2 name their text-encoder layers alike but differ
in width).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import ConfigError
from library.resize.lora_pairs import find_lora_pairs
from library.resize.lycoris import lycoris_to_lora
from networks.lora_file import LoRAFileError, load_lora_file
from networks.svd import lora_matrices, tucker_to_lora_down


@dataclass(frozen=True)
class LoRAModule:
    """One module's update ``scale * up @ down``, factors as 2-D ``out x r`` / ``r x fan_in`` matrices."""

    name: str
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None  # None: the file has no alpha (scale 1)
    down_tail: tuple[int, ...]  # lora_down's shape after the rank: (in,) or (in, kh, kw)
    four_d: bool  # stored as conv tensors (kohya's 1x1 or 3x3 LoCon layout)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def fan_in(self) -> int:
        return self.down.shape[1]

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense update as an ``out x fan_in`` matrix (for checkpoints and tests; merges never build it)."""
        return (self.up.to(dtype) @ self.down.to(dtype)) * self.scale


@dataclass
class LoRAInput:
    """A LoRA file's modules in file order, its metadata and the keys that belong to no module."""

    path: Path
    modules: dict[str, LoRAModule]
    metadata: dict[str, str]
    other_keys: list[str]

    @property
    def base_model_version(self) -> str | None:
        return self.metadata.get("ss_base_model_version")


def modules_of(state_dict: dict[str, torch.Tensor], source: str) -> tuple[dict[str, LoRAModule], list[str]]:
    """The LoRA modules of a state dict (kohya, PEFT, ControlLoRA, Tucker LoCon) and the keys left over."""
    pairs = find_lora_pairs(state_dict, source)
    modules, owned = {}, set()
    for pair in pairs:
        up, down = state_dict[pair.up_key], state_dict[pair.down_key]
        if pair.mid_key in state_dict:
            down = tucker_to_lora_down(state_dict[pair.mid_key].double(), down.double())
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise LoRAFileError(f"{source}: module '{pair.name}' has NaN or infinite weights")
        up2d, down2d = lora_matrices(up, down)
        alpha = state_dict.get(pair.alpha_key)
        modules[pair.name] = LoRAModule(
            pair.name, up2d, down2d, None if alpha is None else float(alpha), tuple(down.shape[1:]), down.dim() == 4
        )
        owned.update(pair.keys)
    return modules, [k for k in state_dict if k not in owned]


def read_lora(path: str | os.PathLike) -> LoRAInput:
    """One LoRA file; :class:`LoRAFileError` naming it if it is unreadable or holds no LoRA modules."""
    state_dict, metadata = load_lora_file(path)
    state_dict = lycoris_to_lora(state_dict, str(path))
    modules, others = modules_of(state_dict, str(path))
    return LoRAInput(Path(path), modules, metadata, others)


def _family(version: str | None) -> str | None:
    """``sd_v1``/``sd_v1_v`` -> ``sd_v1``; SDXL versions start with ``sdxl``."""
    if not version:
        return None
    return version.removesuffix("_v")


def check_same_model(inputs: list[LoRAInput]) -> None:
    """One model family across the files, and every shared module with one layer shape (one line if not)."""
    families = {str(lora.path): _family(lora.base_model_version) for lora in inputs}
    known = {path: family for path, family in families.items() if family is not None}
    if len(set(known.values())) > 1:
        listed = ", ".join(f"'{path}' is {family}" for path, family in known.items())
        raise ConfigError(f"the LoRAs are for different model families ({listed}): merge LoRAs of one base model")
    seen: dict[str, tuple[Path, LoRAModule]] = {}
    for lora in inputs:
        for name, module in lora.modules.items():
            if name not in seen:
                seen[name] = (lora.path, module)
                continue
            first_path, first = seen[name]
            if (first.out_features, first.fan_in) != (module.out_features, module.fan_in) or (
                len(first.down_tail) == 3 and len(module.down_tail) == 3 and first.down_tail != module.down_tail
            ):
                raise ConfigError(
                    f"module '{name}' is {first.out_features}x{first.down_tail} in '{first_path}' but "
                    f"{module.out_features}x{module.down_tail} in '{lora.path}': the LoRAs are for different models"
                )


def read_loras(paths: list[str], ratios: list[float] | None) -> tuple[list[LoRAInput], list[float]]:
    """The ``--models`` files with their ``--ratios`` (all 1.0 when none are given), checked against each other."""
    if not paths:
        raise ConfigError("--models is required: the LoRA files to merge")
    ratios = [1.0] * len(paths) if ratios is None else list(ratios)
    if len(ratios) != len(paths):
        raise ConfigError(f"--ratios has {len(ratios)} values for {len(paths)} --models: give one ratio per model")
    inputs = [read_lora(path) for path in paths]
    check_same_model(inputs)
    return inputs, ratios
