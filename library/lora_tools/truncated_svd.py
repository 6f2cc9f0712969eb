"""The top-k singular triplets of a dense matrix, for extracting a LoRA from a weight difference.

kohya's ``extract_lora_from_models.py`` runs a full float32 ``torch.linalg.svd`` per layer (square
``U`` and ``Vh`` included: an 11520 x 11520 ``Vh`` for SD1.5's largest convs) to keep 4 to 128 of
the singular vectors. Randomized subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4) finds
the same top-k subspace with a few products of the matrix with a thin block: the block's width is
``2k + 8`` (oversampling makes each iteration shrink the error by about ``(S[q] / S[k])^2``), and
iterations stop once the residual ``||A v_i - s_i u_i||`` reaches float32's rounding (1e-7 of
``S[0]``) or stops falling at the float32 floor of the products. That floor is the accuracy class of
kohya's float32 SVD: on SD1.5-shaped differences it lands 4x to 9x below kohya's error on matrices
above ``REFINE_BELOW`` entries, but only 1x to 3x below on smaller ones (LAPACK's error grows with
the size, ours hardly), so those take one more iteration in float64, cheap at their size, which puts
them 6x to 20x below (docs/lora_tools.md).
Each iteration costs two products with the matrix and small work on ``w x w`` matrices: the
residual reuses the product that starts the next iteration. A spectrum too flat to converge in
``max_iter`` iterations falls back to an exact dense SVD, so the answer is never worse than kohya's.
Hand-written: ``torch.svd_lowrank`` takes a fixed iteration count and re-orthonormalises nothing,
so it cannot promise an accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_ITER = 40
_STALL = 0.5  # a residual that falls less than 2x per iteration has reached the rounding floor
_FLOOR = 1e-5  # ... provided it is this small relative to S[0] (before that, slow progress is convergence)
_GOOD = 1e-7  # a residual this small relative to S[0] is float32's rounding: kohya's float32 SVD is no better
REFINE_BELOW = 2**20  # matrices up to this size get one float64 iteration after the float32 ones (see top_singular)


@dataclass(frozen=True)
class TopSingular:
    """``A ~= U diag(S) V^T`` restricted to the top ``k`` triplets (float64)."""

    U: torch.Tensor  # m x k
    S: torch.Tensor  # k
    V: torch.Tensor  # n x k
    iterations: int  # 0: solved by a dense SVD


def _dense(matrix: torch.Tensor, k: int) -> TopSingular:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return TopSingular(u[:, :k], s[:k], vh[:k].T, 0)


def _ritz(q: torch.Tensor, block: torch.Tensor, k: int):
    """Top-``k`` Ritz triplets ``(u, s, v)`` (float64) of the matrix on the basis ``q``, given ``block = q^T A``."""
    u_small, s, vh = torch.linalg.svd(block.double(), full_matrices=False)
    return q.double() @ u_small[:, :k], s[:k], vh[:k].T


def _refined(a: torch.Tensor, q: torch.Tensor, k: int, iterations: int) -> TopSingular:
    """One more subspace iteration in float64 from the converged float32 basis, then the Ritz triplets.

    It takes the subspace a further ``(S[q] / S[k])^2`` below the float32 floor of the products.
    """
    a64 = a.double()
    q64 = torch.linalg.qr(a64 @ torch.linalg.qr(a64.T @ q.double()).Q).Q
    u, s, v = _ritz(q64, q64.T @ a64, k)
    return TopSingular(u, s, v, iterations + 1)


def top_singular(
    matrix: torch.Tensor, k: int, seed: int = 0, max_iter: int = MAX_ITER, dense_below: int = 64
) -> TopSingular:
    """Top ``k`` singular triplets of ``matrix`` (computed in its dtype, float32 for half inputs; results float64).

    Small matrices (``min(m, n) <= dense_below`` or a block as wide as a third of them) take a dense SVD.
    """
    m, n = matrix.shape
    k = min(k, m, n)
    width = min(2 * k + 8, m, n)
    if min(m, n) <= dense_below or 3 * width >= min(m, n):
        return _dense(matrix, k)
    a = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    generator = torch.Generator(device=a.device).manual_seed(seed)
    probe = torch.randn(n, width, generator=generator, device=a.device, dtype=a.dtype)
    q = torch.linalg.qr(a @ probe).Q
    previous = float("inf")
    for iteration in range(1, max_iter + 1):
        # q^T A = R^T P^T (a thin QR of its transpose): the Ritz triplets come from the SVD of the
        # w x w matrix R^T instead of the w x n block (3x less CPU per iteration on 768 x 768), and
        # A P, the product that starts the next iteration, gives the residual: v = P v_small.
        # The QR runs in float64: cheap on n x w, and it adds no float32 rounding to the Ritz values.
        row_basis, r = torch.linalg.qr((q.T @ a).T.double())  # q^T A, then transposed: 2x faster than A^T q
        product = a @ row_basis.to(a.dtype)
        small_u, s, small_vh = torch.linalg.svd(r.T)
        small_u, s, small_v = small_u[:, :k], s[:k], small_vh[:k].T
        u = q.double() @ small_u
        residual = torch.linalg.vector_norm(product.double() @ small_v - u * s, dim=0).max()
        relative = float(residual) / max(float(s[0]), torch.finfo(torch.float64).tiny)
        if relative <= _GOOD or (relative <= _FLOOR and relative > _STALL * previous):
            if a.dtype == torch.float32 and m * n <= REFINE_BELOW:
                return _refined(a, q, k, iteration)
            return TopSingular(u, s, row_basis @ small_v, iteration)
        previous = relative
        q = torch.linalg.qr(product).Q
    return _dense(matrix, k)


def subspace_error(basis: torch.Tensor, reference: torch.Tensor) -> float:
    """sin of the largest principal angle between the spans of two orthonormal bases (columns), in float64."""
    basis, reference = basis.double(), reference.double()
    return float(torch.linalg.matrix_norm(basis - reference @ (reference.T @ basis), ord=2))


def span_error(columns: torch.Tensor, reference: torch.Tensor) -> float:
    """sin of the largest principal angle between the column spans of two full-rank matrices, in float64.

    For factors as files store them (``up = U S`` is not orthonormal): both are orthonormalised first.
    """
    return subspace_error(torch.linalg.qr(columns.double()).Q, torch.linalg.qr(reference.double()).Q)
