"""What is in a LoRA file: its metadata, whether its ``sshs_*`` hashes still match, and each module's rank/alpha/norm.

The norm of a module's update ``scale * up @ down`` comes from the factors
(``||up @ down||_F^2 = <up^T up, down down^T>``), so inspecting a large LoCon builds no dense matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from library.lora_tools.lora_sets import LoRAModule, modules_of
from networks.lora_file import sshs_hashes

LORA_KEY_MARKERS = ("lora_up", "lora_down", "lora_A", "lora_B", "oft_")


@dataclass(frozen=True)
class HashCheck:
    """The file's ``sshs_*`` values against the ones computed from its tensors (None: not in the file)."""

    stored_model: str | None
    stored_legacy: str | None
    model: str
    legacy: str

    @property
    def ok(self) -> bool:
        return self.stored_model == self.model and self.stored_legacy == self.legacy

    def describe(self) -> str:
        if self.stored_model is None and self.stored_legacy is None:
            return f"no sshs hashes in the file (computed: model {self.model}, legacy {self.legacy})"
        parts = []
        for label, stored, computed in (
            ("model", self.stored_model, self.model),
            ("legacy", self.stored_legacy, self.legacy),
        ):
            parts.append(f"{label} {'ok' if stored == computed else f'MISMATCH (file {stored}, tensors {computed})'}")
        return "sshs hashes: " + ", ".join(parts)


def check_hashes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> HashCheck:
    model, legacy = sshs_hashes(state_dict, metadata)
    return HashCheck(metadata.get("sshs_model_hash"), metadata.get("sshs_legacy_hash"), model, legacy)


@dataclass(frozen=True)
class ModuleSummary:
    name: str
    kind: str  # linear, conv1x1, conv3x3, ...
    rank: int
    alpha: float | None
    update_norm: float  # ||scale * up @ down||_F

    @property
    def untrained(self) -> bool:
        return self.update_norm == 0


def update_norm(module: LoRAModule) -> float:
    """Frobenius norm of ``scale * up @ down`` from the r x r Gram matrices of the factors (float64)."""
    up, down = module.up.double(), module.down.double()
    squared = float(((up.T @ up) * (down @ down.T)).sum())
    return abs(module.scale) * math.sqrt(max(squared, 0.0))


def summarize(module: LoRAModule) -> ModuleSummary:
    if len(module.down_tail) == 3:
        kind = f"conv{module.down_tail[1]}x{module.down_tail[2]}"
    else:
        kind = "conv1x1" if module.four_d else "linear"
    return ModuleSummary(module.name, kind, module.rank, module.alpha, update_norm(module))


def module_summaries(state_dict: dict[str, torch.Tensor], source: str) -> list[ModuleSummary]:
    modules, _ = modules_of(state_dict, source)
    return [summarize(module) for module in modules.values()]


def summary_table(summaries: list[ModuleSummary]) -> str:
    width = max(len(s.name) for s in summaries)
    lines = [f"{'module':<{width}}  {'kind':<8} {'rank':>4} {'alpha':>8} {'||update||':>11}  note"]
    for s in summaries:
        alpha = "-" if s.alpha is None else f"{s.alpha:g}"
        note = "zero update (untrained?)" if s.untrained else ""
        lines.append(f"{s.name:<{width}}  {s.kind:<8} {s.rank:>4} {alpha:>8} {s.update_norm:>11.4g}  {note}".rstrip())
    ranks = sorted({s.rank for s in summaries})
    lines.append(
        f"{len(summaries)} modules, ranks {', '.join(map(str, ranks))}; {sum(s.untrained for s in summaries)} zero"
    )
    return "\n".join(lines)


def kohya_key_lines(state_dict: dict[str, torch.Tensor], show_all_keys: bool) -> list[str]:
    """kohya's ``check_lora_weights.py`` output: counts, then ``key,shape,mean|w|,min|w|`` per tensor."""
    selected = [k for k in state_dict if any(marker in k for marker in LORA_KEY_MARKERS)]
    lines = [f"number of LoRA modules: {len(selected)}"]
    if show_all_keys:
        selected += [k for k in state_dict if k not in selected]
        lines.append(f"number of all modules: {len(selected)}")
    for key in selected:
        value = state_dict[key].float().abs()
        shape = str(tuple(value.shape)).replace(", ", "-")
        mean, least = (float(value.mean()), float(value.min())) if value.numel() else (0.0, 0.0)
        lines.append(f"{key},{shape},{mean},{least}")
    return lines
