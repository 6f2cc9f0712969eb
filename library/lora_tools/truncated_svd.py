"""The top-k singular triplets of a dense matrix, for extracting a LoRA from a weight difference.

kohya's ``extract_lora_from_models.py`` runs a full float32 ``torch.linalg.svd`` per layer (square
``U`` and ``Vh`` included: an 11520 x 11520 ``Vh`` for SD1.5's largest convs) to keep 4 to 128 of
the singular vectors. Randomized subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4) finds
the same top-k subspace with a few products of the matrix with a thin block: the block's width is
``2k + 8`` (oversampling makes each iteration shrink the error by about ``(S[q] / S[k])^2``), and
iterations stop once the residual ``||A v_i - s_i u_i||`` stops falling, i.e. at the float32 floor
of the products (about 2e-7 of ``S[0]``); two more iterations in float64 then take the subspace
below that floor (measured: 10x to 50x below the subspace error of kohya's float32 SVD). A
spectrum too flat to converge in ``max_iter`` iterations falls back to an exact dense SVD, so the
answer is never worse than kohya's. Hand-written: ``torch.svd_lowrank``
takes a fixed iteration count and re-orthonormalises nothing, so it cannot promise an accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_ITER = 40
REFINE = 2  # float64 iterations after the float32 ones converge
_STALL = 0.5  # a residual that falls less than 2x per iteration has reached the rounding floor
_FLOOR = 1e-5  # ... provided it is this small relative to S[0] (before that, slow progress is convergence)
_GOOD = 1e-7  # a residual this small relative to S[0] is well below kohya's float32 error: done


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


def _ritz(q: torch.Tensor, matrix: torch.Tensor, k: int):
    block = q.T @ matrix  # q x n
    u_small, s, vh = torch.linalg.svd(block.double(), full_matrices=False)
    return block, q.double() @ u_small[:, :k], s[:k], vh[:k].T


def _refined(a: torch.Tensor, q: torch.Tensor, k: int, iterations: int) -> TopSingular:
    """REFINE more subspace iterations in float64 from the converged float32 block, then the Ritz triplets.

    Each takes the subspace error below the float32 rounding floor of the products by a further
    ``(S[q] / S[k])^2``, for about a quarter more time.
    """
    a64, q64 = a.double(), q.double()
    for _ in range(REFINE):
        q64 = torch.linalg.qr(a64 @ torch.linalg.qr(a64.T @ q64).Q).Q
    _, u, s, v = _ritz(q64, a64, k)
    return TopSingular(u, s, v, iterations + REFINE)


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
        block, u, s, v = _ritz(q, a, k)
        residual = float(torch.linalg.vector_norm((a @ v.to(a.dtype)).double() - u * s, dim=0).max())
        relative = residual / max(float(s[0]), torch.finfo(torch.float64).tiny)
        if relative <= _GOOD or (relative <= _FLOOR and relative > _STALL * previous):
            return _refined(a, q, k, iteration)
        previous = relative
        q = torch.linalg.qr(a @ torch.linalg.qr(block.T).Q).Q
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
