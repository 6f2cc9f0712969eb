"""Initialise narrow FFNs from calibration statistics: which hidden units to keep, and a refit ``ff.net.2``.

Why both methods *select* units. A GEGLU computes ``value_i * gelu(gate_i)`` unit by unit, so the
only linear maps of its hidden space that a narrower GEGLU can express are permutations and
per-unit scalings (a value row times a, its ``net.2`` column times 1/a). A PCA basis is a dense
rotation: projecting the value *and* gate rows onto it (:func:`literal_pca_rotation`) gives units
``(Vᵀv)_j * gelu((Vᵀg)_j)`` that approximate nothing, and it is not exact even at full width. What
a PCA can legally do is say *which* units span the principal subspace:

* ``pca``: PCA of the output-scaled hidden activation ``diag(|W2[:, i]|) h`` (scaled so that the
  function-preserving rescaling above leaves it unchanged, which plain PCA of ``h`` is not), then
  the k units that best span its top-k principal subspace, by column-pivoted QR of the basis
  (Q-DEIM, Drmač & Gugercin 2016). Its oblique projection onto the kept units stays within a factor
  ``|V_k[S, :]^-1|²`` of PCA's discarded variance.
* ``prune``: the k units with the largest ``std(h_i) * |W2[:, i]|`` (FLAP's fluctuation score,
  An et al. 2024): each unit's output energy beyond its mean, which the refit keeps anyway.

Both then fold the dropped units into the kept ones by least squares (:func:`fold_into_kept`):
``net.2`` becomes the best linear readout of ``W2 h + b2`` from the kept units on the calibration
data. With nothing dropped it is the original FFN, exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from library.errors import ConfigError
from library.ffn_compression.statistics import HiddenStats
from networks.lowrank_ffn import LowRankFFNNetwork, ffn_layers

INIT_METHODS = ("pca", "prune")
MIN_RIDGE = 1e-6  # keeps the refit finite for collinear units even with plenty of tokens


def default_ridge(kept: int, tokens: int) -> float:
    """Ridge of the refit, relative to the kept units' mean variance: k/N for k units and N fit tokens.

    That is the order of the ridge-regression optimum when what the kept units cannot explain is
    about as large as what they can; it fades as calibration grows (N >> k) and holds the refit
    back where N is close to k, where an unregularised fit would chase noise.
    """
    return max(MIN_RIDGE, kept / max(tokens, 1))


@dataclass(frozen=True)
class PrincipalAxes:
    """Eigenvalues (descending) and eigenvectors (columns, same order) of a covariance."""

    values: torch.Tensor
    vectors: torch.Tensor

    @classmethod
    def of(cls, covariance: torch.Tensor, device: torch.device | str | None = None) -> PrincipalAxes:
        """Eigendecomposition in float64 on ``device`` (a GPU does 5120² in seconds; a CPU takes minutes)."""
        values, vectors = torch.linalg.eigh(covariance.to(device or covariance.device, torch.float64))
        return cls(values.flip(0).clamp(min=0).cpu(), vectors.flip(1).cpu())


def output_norms(out_weight: torch.Tensor) -> torch.Tensor:
    """``|W2[:, i]|``: how much unit i's activation moves the FFN output."""
    return out_weight.detach().double().norm(dim=0).cpu()


def scaled_axes(stats: HiddenStats, out_weight: torch.Tensor) -> PrincipalAxes:
    """Principal axes of ``diag(|W2[:, i]|) h``, the hidden activation in output units (computed where W2 is)."""
    scale = output_norms(out_weight)
    return PrincipalAxes.of(scale[:, None] * stats.covariance().cpu() * scale[None, :], out_weight.device)


def pca_units(axes: PrincipalAxes, k: int) -> torch.Tensor:
    """The k units (sorted) that best span the top-k principal subspace: Q-DEIM's column-pivoted QR."""
    basis = np.asfortranarray(axes.vectors[:, :k].numpy().T)
    _, pivots = scipy.linalg.qr(basis, mode="r", pivoting=True, overwrite_a=True, check_finite=False)
    return torch.from_numpy(np.sort(pivots[:k]))


def prune_units(stats: HiddenStats, out_weight: torch.Tensor, k: int) -> torch.Tensor:
    """The k units (sorted) with the largest ``std(h_i) * |W2[:, i]|``."""
    scores = stats.covariance().cpu().diagonal().clamp(min=0).sqrt() * output_norms(out_weight)
    return scores.topk(k).indices.sort().values


def fold_into_kept(
    stats: HiddenStats,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor | None,
    kept: torch.Tensor,
    ridge: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``net.2`` weight (C x k) and bias that best reproduce ``W2 h + b2`` from the kept units alone.

    The dropped units D are regressed on the kept ones S, ``h_D ≈ μ_D + B (h_S - μ_S)`` with
    ``B = Σ_DS (Σ_SS + λI)⁻¹``, and their columns folded in: ``W' = W2_S + W2_D B``,
    ``b' = b2 + W2_D (μ_D - B μ_S)``. With D empty this is ``W2_S``, ``b2`` untouched.
    ``λ = ridge * mean var(h_S)``; ``ridge`` defaults to :func:`default_ridge`.
    """
    weight = out_weight.detach().double().cpu()
    bias = None if out_bias is None else out_bias.detach().double().cpu()
    kept = torch.as_tensor(kept, dtype=torch.long)
    dropped_mask = torch.ones(stats.width, dtype=torch.bool)
    dropped_mask[kept] = False
    dropped = dropped_mask.nonzero().squeeze(1)
    if dropped.numel() == 0:
        return weight[:, kept], bias
    covariance, mean = stats.covariance().cpu(), stats.mean.cpu()
    kept_cov = covariance[kept][:, kept]
    ridge = default_ridge(len(kept), stats.count) if ridge is None else ridge
    damping = ridge * kept_cov.diagonal().mean().clamp(min=torch.finfo(torch.float64).tiny)
    regression = torch.linalg.solve(
        kept_cov + damping * torch.eye(len(kept), dtype=torch.float64), covariance[kept][:, dropped]
    ).T
    folded = weight[:, kept] + weight[:, dropped] @ regression
    if bias is not None:
        bias = bias + weight[:, dropped] @ (mean[dropped] - regression @ mean[kept])
    return folded, bias


def choose_units(
    method: str, stats: HiddenStats, out_weight: torch.Tensor, k: int, axes: PrincipalAxes | None = None
) -> torch.Tensor:
    """The k units ``method`` keeps; ``axes`` (pca only) saves recomputing :func:`scaled_axes`."""
    if method == "pca":
        return pca_units(axes or scaled_axes(stats, out_weight), k)
    if method == "prune":
        return prune_units(stats, out_weight, k)
    raise ConfigError(f"--init '{method}' is unknown; use one of {', '.join(INIT_METHODS)}")


def initialise_network(
    network: LowRankFFNNetwork,
    stats: Mapping[str, HiddenStats],
    method: str,
    ridge: float | None = None,
    axes_cache: dict[str, PrincipalAxes] | None = None,
) -> None:
    """Set every narrow FFN of ``network`` from its original and calibration ``stats`` (``pca``/``prune``).

    ``axes_cache`` keeps each FFN's eigendecomposition across calls (several widths from one calibration).
    """
    for module in network.ffn_modules:
        if module.lora_name not in stats:
            raise ConfigError(
                f"the calibration has no statistics for {module.lora_name}: calibrate with the same blocks"
            )
        module_stats = stats[module.lora_name]
        _, out = ffn_layers(module.lora_name, module.original)
        axes = None
        if method == "pca" and axes_cache is not None:
            if module.lora_name not in axes_cache:
                axes_cache[module.lora_name] = scaled_axes(module_stats, out.weight)
            axes = axes_cache[module.lora_name]
        kept = choose_units(method, module_stats, out.weight, module.hidden_width, axes)
        weight, bias = fold_into_kept(module_stats, out.weight, out.bias, kept, ridge)
        module.set_units(kept, weight.float(), None if bias is None else bias.float())
    network.init_method = method


# --------------------------------------------------------------------------------------------------
# The article's method taken literally, for comparison (bench/bench_lowrank_ffn.py, docs)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bottleneck:
    """A rank-k map ``up @ down`` (+ ``bias``) standing in for ``net.2`` after the full-width GEGLU."""

    down: torch.Tensor  # (k, n)
    up: torch.Tensor  # (C, k)
    bias: torch.Tensor | None
    discarded_variance: float  # sum of the dropped eigenvalues of cov(h)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        out = (hidden.double() @ self.down.T) @ self.up.T
        return out if self.bias is None else out + self.bias


def pca_bottleneck(stats: HiddenStats, out_weight: torch.Tensor, out_bias: torch.Tensor | None, k: int) -> Bottleneck:
    """The article's student as we read it: PCA of ``h``, ``net.2 ∘ (μ + V_k V_kᵀ (h - μ))``.

    Its error in ``h`` is exactly PCA's discarded variance, but the GEGLU keeps its full width, so
    it saves only ``4C·C - k·(4C + C)`` of an FFN's ``12C²`` parameters.
    """
    axes = PrincipalAxes.of(stats.covariance().cpu())
    basis = axes.vectors[:, :k]
    weight = out_weight.detach().double().cpu()
    mean = stats.mean.cpu()
    bias = weight @ (mean - basis @ (basis.T @ mean))
    if out_bias is not None:
        bias = bias + out_bias.detach().double().cpu()
    return Bottleneck(basis.T, weight @ basis, bias, float(axes.values[k:].sum()))


def literal_pca_rotation(
    stats: HiddenStats, proj_weight, proj_bias, out_weight, out_bias, k: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """A narrow GEGLU whose value and gate rows are both projected on the top-k PCA basis of ``h``.

    ``(net.0.proj weight, bias, net.2 weight, bias)``. Unit j computes ``(Vᵀv)_j * gelu((Vᵀg)_j)``,
    which is no projection of ``h = v * gelu(g)``: it differs from the original FFN even at full
    width, which is why :func:`initialise_network` selects units instead.
    """
    bottleneck = pca_bottleneck(stats, out_weight, out_bias, k)
    value, gate = proj_weight.detach().double().cpu().chunk(2)
    weight = torch.cat([bottleneck.down @ value, bottleneck.down @ gate])
    bias = None
    if proj_bias is not None:
        value_bias, gate_bias = proj_bias.detach().double().cpu().chunk(2)
        bias = torch.cat([bottleneck.down @ value_bias, bottleneck.down @ gate_bias])
    return weight, bias, bottleneck.up, bottleneck.bias
