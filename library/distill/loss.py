"""The distillation objective: task loss + output KD + feature KD (BK-SDM / Segmind, distill.md §2.1).

``L = w_task * MSE(student, target) + w_out * MSE(student, teacher) + w_feat * sum_l MSE(f_s^l, f_t^l)``

Every term is computed in float32 whatever the models run in. With ``feature_kd_normalize`` each
feature term is divided by the teacher feature's mean square, so that the few large-magnitude
blocks that dominate the plain sum (BK-SDM issues #21/#33; LAPTOP-Diff's "imbalance") weigh no
more than the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from library.distill.features import FeaturePair

# Keeps a normalised term finite for an all-zero teacher feature (which no trained UNet produces).
_NORMALIZE_EPS = 1e-12


@dataclass(frozen=True)
class DistillWeights:
    """Loss weights; BK-SDM uses 1/1/1, Segmind's README 1/0.5/0.5."""

    task: float = 1.0
    output_kd: float = 1.0
    feature_kd: float = 1.0
    feature_kd_normalize: bool = False


@dataclass
class DistillLoss:
    """The total to backpropagate and its parts (unweighted), for logging."""

    total: torch.Tensor
    task: torch.Tensor
    output_kd: torch.Tensor
    feature_kd: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def log_values(self, prefix: str = "loss/") -> dict[str, float]:
        values = {"total": self.total, "task": self.task, "kd_output": self.output_kd, "kd_feature": self.feature_kd}
        values.update({f"kd_feature/{name}": value for name, value in self.features.items()})
        return {prefix + name: float(value.detach()) for name, value in values.items()}


def feature_kd_loss(
    student_features: Mapping[str, torch.Tensor],
    teacher_features: Mapping[str, torch.Tensor],
    pairs: Sequence[FeaturePair],
    normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of per-pair MSEs; pairs whose student block did not run (Theseus) are left out."""
    terms = {}
    for pair in pairs:
        if pair.student not in student_features:
            continue
        target = teacher_features[pair.teacher].detach().float()
        term = F.mse_loss(student_features[pair.student].float(), target)
        if normalize:
            term = term / (target.square().mean() + _NORMALIZE_EPS)
        terms[pair.student] = term
    if not terms:
        # A 0-dim tensor combines with tensors on any device.
        return torch.zeros(()), terms
    return torch.stack(list(terms.values())).sum(), terms


def distill_loss(
    student_pred: torch.Tensor,
    teacher_pred: torch.Tensor,
    target: torch.Tensor,
    student_features: Mapping[str, torch.Tensor],
    teacher_features: Mapping[str, torch.Tensor],
    pairs: Sequence[FeaturePair],
    weights: DistillWeights,
    task_loss: torch.Tensor | None = None,
) -> DistillLoss:
    """The weighted objective; ``target`` is the noise (or v) the task loss regresses to.

    ``task_loss`` replaces the plain MSE task term, for a script that weighs it with kohya's options
    (loss type, min-SNR, prior-loss weights); the KD terms stay plain MSEs, as in BK-SDM.
    """
    student_pred = student_pred.float()
    task = F.mse_loss(student_pred, target.float()) if task_loss is None else task_loss
    output_kd = F.mse_loss(student_pred, teacher_pred.detach().float())
    feature_kd, terms = feature_kd_loss(student_features, teacher_features, pairs, weights.feature_kd_normalize)
    total = weights.task * task + weights.output_kd * output_kd + weights.feature_kd * feature_kd
    return DistillLoss(total=total, task=task, output_kd=output_kd, feature_kd=feature_kd, features=terms)
