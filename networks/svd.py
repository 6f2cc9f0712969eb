"""SVD of a LoRA update ``up @ down`` from its factors, and kohya's rank-selection rules.

A rank-r LoRA is already factored, so its SVD never needs the dense ``out x in`` product that
kohya's ``resize_lora.py`` builds and decomposes. Write the update as ``A @ B`` with ``A`` the factor
with fewer rows (``up``, or ``down^T`` when ``in < out``: then the transpose is decomposed). With a
thin QR ``A = Q R``::

    A @ B = Q (R B),    (R B)(R B)^T = R (B B^T) R^T = W diag(S^2) W^T   (an r x r eigenproblem)

so ``S`` is the spectrum, ``U = Q W`` and ``V diag(S) = B^T R^T W``. The cost is one QR of the short
factor and one Gram matrix of the long one, O((out + in) r^2), instead of the dense SVD's
O(out in min(out, in)); the long factor never goes through a QR (a Gram matrix is a single
matrix product, several times faster), and only the kept singular vectors are ever formed.

In float64 the singular values agree with a dense float64 SVD to about 1e-16 (S[0] / S[i])^2
relative, far below what fp16/bf16 weights carry; the truncated update is the exact projection of
``up @ down`` onto its top singular vectors.

Conv layers use kohya's matrix view: ``down`` (r, in, kh, kw) is an r x (in kh kw) matrix and ``up``
(out, r, 1, 1) an out x r matrix.

Pure tensor functions; imports only torch, because kohya users copy ``networks/`` files into
their own checkout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
# kohya's MIN_SV: a module whose largest singular value is at most this is a zero update -> rank 1.
ZERO_SINGULAR_VALUE = 1e-6


def lora_matrices(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` as 2-D ``out x r`` and ``r x in*kh*kw`` views; ``ValueError`` if they do not pair."""
    if up.dim() != down.dim() or up.dim() not in (2, 4):
        raise ValueError(f"up {tuple(up.shape)} and down {tuple(down.shape)} are not a linear or conv LoRA pair")
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise ValueError(f"conv up {tuple(up.shape)} must have a 1x1 kernel")
    up2d, down2d = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    if up2d.shape[1] != down2d.shape[0]:
        raise ValueError(
            f"rank mismatch: up {tuple(up.shape)} has rank {up2d.shape[1]}, down {tuple(down.shape)} {down2d.shape[0]}"
        )
    return up2d, down2d


def tucker_to_lora_down(mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Fold a LyCORIS Tucker LoCon ``lora_mid`` (r, r, kh, kw) into its 1x1 ``lora_down`` (r, in, 1, 1).

    ``up ∘ mid ∘ down`` equals ``up ∘ down'`` with ``down'`` (r, in, kh, kw), so a Tucker LoCon is an
    ordinary LoCon of the same rank (and then loads in diffusers, which rejects ``lora_mid``).
    """
    if mid.dim() != 4 or down.dim() != 4 or mid.shape[1] != down.shape[0] or tuple(down.shape[2:]) != (1, 1):
        raise ValueError(f"lora_mid {tuple(mid.shape)} and lora_down {tuple(down.shape)} are not a Tucker LoCon pair")
    return torch.einsum("abhw,bc->achw", mid, down[:, :, 0, 0])


def _upper_triangle(matrix: torch.Tensor) -> torch.Tensor:
    # Not torch.triu: it opens an OpenMP region even for one small matrix, which costs milliseconds
    # per call on a busy machine; this comparison runs serially below torch's parallel grain size.
    rows = torch.arange(matrix.shape[0], device=matrix.device)[:, None]
    cols = torch.arange(matrix.shape[1], device=matrix.device)[None, :]
    return torch.where(rows <= cols, matrix, 0)


def _householder(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reflectors, tau, R) of the thin QR of ``matrix``; R is min(rows, cols) x cols."""
    reflectors, tau = torch.geqrf(matrix)
    return reflectors, tau, _upper_triangle(reflectors[: min(matrix.shape)])


@dataclass(frozen=True)
class LoRASVD:
    """``up @ down = U diag(S) V^T``, held as ``A = Q R`` and the eigenvectors ``W`` (see the module docstring)."""

    S: torch.Tensor
    _transposed: bool  # A = down^T (the in side is shorter), so U and V swap roles
    _reflectors: tuple[torch.Tensor, torch.Tensor]  # Householder form of Q
    _r: torch.Tensor
    _long: torch.Tensor  # B, r x n
    _eigenvectors: torch.Tensor  # W, descending

    def _short_side(self, rank: int) -> torch.Tensor:
        """``Q W_k``: unit singular vectors on A's side."""
        return _apply_q(*self._reflectors, self._eigenvectors[:, :rank])

    def _long_side(self, rank: int) -> torch.Tensor:
        """``B^T R^T W_k``: singular vectors on B's side, each scaled by its singular value."""
        # As (W_k^T R B)^T: the long dimension as a GEMM's columns is 1.4x faster than as its rows.
        return ((self._eigenvectors[:, :rank].T @ self._r) @ self._long).T

    def singular_vectors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``rank`` left (out x rank) and right (in x rank) unit singular vectors."""
        short, long = self._short_side(rank), _unit_columns(self._long_side(rank))[0]
        return (long, short) if self._transposed else (short, long)

    def truncate(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Best rank-``rank`` factors in kohya's layout: ``up = U_k diag(S_k)``, ``down = V_k^T`` (2-D)."""
        if not 1 <= rank <= len(self.S):
            raise ValueError(f"rank {rank} outside 1..{len(self.S)}")
        short, long = self._short_side(rank), self._long_side(rank)
        if self._transposed:
            return long, short.T.contiguous()
        # Normalizing by the columns' own norms (= S_k up to rounding) keeps up @ down the exact
        # projection Q W_k W_k^T Q^T (up @ down), and a zero update a valid pair.
        directions, norms = _unit_columns(long)
        return short * norms, directions.T.contiguous()


def _unit_columns(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns scaled to unit length, their norms); a zero column becomes the first basis vector."""
    norms = torch.linalg.vector_norm(matrix, dim=0)
    units = matrix / torch.where(norms > 0, norms, 1)
    units[0, norms == 0] = 1  # a zero update still needs a valid (unit) direction
    return units, norms


def _apply_q(reflectors: torch.Tensor, tau: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    padded = small.new_zeros(reflectors.shape[0], small.shape[1])
    padded[: small.shape[0]] = small
    return torch.ormqr(reflectors, tau, padded)


class NonFiniteFactors(ValueError):
    """The LoRA factors hold NaN or infinite values (found on the small Gram matrices, not the inputs)."""


def symmetric_gram(matrix: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``matrix @ matrix.T``, computing only the blocks on and below the diagonal (torch has no ``syrk``).

    The Gram product of the long factor is the largest matrix product of the SVD; with ``blocks``
    row blocks, only ``(blocks + 1) / (2 blocks)`` of the full product's flops are spent
    (measured: 16% less CPU on the 350 SD1.5 modules at rank 512, docs/resize.md).
    """
    rows = matrix.shape[0]
    step = -(-rows // blocks)
    if rows <= step:
        return matrix @ matrix.T
    gram = matrix.new_empty(rows, rows)
    for i in range(0, rows, step):
        for j in range(0, i + 1, step):
            block = matrix[i : i + step] @ matrix[j : j + step].T
            gram[i : i + step, j : j + step] = block
            if i != j:
                gram[j : j + step, i : i + step] = block.T
    return gram


def _gram_of_core(up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype):
    """(transposed, Householder QR of A, R, B, R (B B^T) R^T) for ``up @ down`` or its transpose.

    Raises :class:`NonFiniteFactors` for NaN/inf factors. The check runs on ``R`` and ``B B^T``
    (r x r) instead of the inputs: a NaN or inf anywhere in a factor reaches them (each entry of
    ``B`` enters a diagonal entry of ``B B^T`` squared; the QR carries every entry of ``A`` into
    ``R`` or a column norm on its diagonal), and checking fp16 inputs directly cost 10% of a
    whole-file resize.
    """
    up2d, down2d = lora_matrices(up, down)
    transposed = up2d.shape[0] > down2d.shape[1]
    short, long = (down2d.T, up2d.T) if transposed else (up2d, down2d)
    reflectors, tau, r = _householder(short.to(dtype))
    long = long.to(dtype)
    long_gram = symmetric_gram(long)
    if not (torch.isfinite(long_gram).all() and torch.isfinite(r).all()):
        raise NonFiniteFactors("NaN or infinite weights")
    return transposed, (reflectors, tau), r, long, r @ long_gram @ r.T


def factored_svd(up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype = torch.float64) -> LoRASVD:
    """SVD of ``up @ down`` (linear or conv LoRA pair) computed in ``dtype`` on their device.

    ``S`` has min(rank, out, in*kh*kw) entries: every other singular value is exactly zero.
    """
    transposed, reflectors, r, long, gram = _gram_of_core(up, down, dtype)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    spectrum = eigenvalues.flip(0).clamp_min(0).sqrt()
    return LoRASVD(spectrum, transposed, reflectors, r, long, eigenvectors.flip(1))


def factored_singular_values(up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Just ``S`` of :func:`factored_svd` (no singular vectors: cheaper, for previews)."""
    return torch.linalg.eigvalsh(_gram_of_core(up, down, dtype)[-1]).flip(0).clamp_min(0).sqrt()


def lora_pair(up2d: torch.Tensor, down2d: torch.Tensor, down_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D factors back in the layout of the original ``down`` (conv: up (out, k, 1, 1), down (k, in, kh, kw))."""
    if len(down_shape) == 2:
        return up2d, down2d
    rank = down2d.shape[0]
    return up2d.reshape(*up2d.shape, 1, 1), down2d.reshape(rank, *down_shape[1:])


# --- rank selection ------------------------------------------------------------------------------


def _first_reaching(fractions: torch.Tensor, target: float, full_length: int) -> int:
    """kohya's ``searchsorted`` on a cumulative spectrum zero-padded to ``full_length``.

    The padding adds nothing, so a target the true spectrum never reaches lands past the end.
    """
    index = int(torch.searchsorted(fractions, torch.tensor(target, dtype=fractions.dtype)))
    return index if index < len(fractions) else full_length


def kohya_dynamic_rank(spectrum: torch.Tensor, method: str, param: float, full_length: int) -> int:
    """The rank kohya's ``resize_lora.py`` picks for ``--dynamic_method``/``--dynamic_param``.

    ``spectrum`` holds the non-zero singular values; kohya decomposes the dense matrix, whose
    spectrum is that padded with zeros to ``full_length = min(out, in*kh*kw)``. Like kohya
    (sd-scripts v0.10.1), the index is clamped to ``[1, full_length - 1]`` and one is added, so it
    keeps one singular value more than the criterion needs and never picks fewer than 2.
    """
    if not param > 0:
        raise ValueError(f"--dynamic_param must be positive, got {param}")
    if method == "sv_ratio":
        threshold = spectrum[0] / param
        index = int((spectrum > threshold).sum())
    elif method in ("sv_cumulative", "sv_fro"):
        weights = spectrum.double() if method == "sv_cumulative" else spectrum.double() ** 2
        target = param if method == "sv_cumulative" else param**2
        cumulative = torch.cumsum(weights, 0)
        index = _first_reaching(cumulative / cumulative[-1], target, full_length) + 1
    else:
        raise ValueError(f"unknown dynamic method '{method}' (choose from {', '.join(DYNAMIC_METHODS)})")
    return max(1, min(index, full_length - 1)) + 1


@dataclass(frozen=True)
class RankChoice:
    """The rank kept for one module, and kohya's pick when it differs."""

    rank: int
    kohya_rank: int

    @property
    def capped_at_input(self) -> bool:
        """kohya's rule asked for more singular values than the update has (it would add zeros)."""
        return self.kohya_rank > self.rank


def select_rank(
    spectrum: torch.Tensor,
    max_rank: int,
    full_length: int,
    dynamic_method: str | None = None,
    dynamic_param: float | None = None,
) -> RankChoice:
    """kohya's rank for a module (``max_rank`` = ``--new_rank``/``--new_conv_rank``), at most ``len(spectrum)``.

    A zero update (largest singular value <= 1e-6) gets rank 1, as in kohya.
    """
    if float(spectrum[0]) <= ZERO_SINGULAR_VALUE:
        return RankChoice(1, 1)
    if dynamic_method is None:
        kohya = max_rank
    else:
        if dynamic_param is None:
            raise ValueError(f"--dynamic_method {dynamic_method} needs --dynamic_param")
        kohya = min(kohya_dynamic_rank(spectrum, dynamic_method, dynamic_param, full_length), max_rank)
    return RankChoice(min(kohya, len(spectrum)), kohya)


@dataclass(frozen=True)
class Retention:
    """How much of a module's update a rank keeps (kohya's ``--verbose`` figures)."""

    sum_retained: float
    fro_retained: float
    max_ratio: float


def retention(spectrum: torch.Tensor, rank: int) -> Retention:
    """Share of sum(S) and of the Frobenius norm kept by the first ``rank`` values (NaN for a zero update)."""
    s = spectrum.double()
    squares = s**2
    return Retention(
        sum_retained=float(s[:rank].sum() / s.sum()),
        fro_retained=float(torch.sqrt(squares[:rank].sum() / squares.sum())),
        max_ratio=float(s[0] / s[rank - 1]),
    )
