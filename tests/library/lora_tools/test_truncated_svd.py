"""top_singular against float64 dense SVDs: within kohya's own float32 error, and exact fallbacks."""

import math

import pytest
import torch

from library.lora_tools.truncated_svd import REFINE_BELOW, span_error, subspace_error, top_singular
from library.synthetic_lora import decaying_matrix


# (1100, 1000): above REFINE_BELOW, float32 iterations only; the others end with a float64 one.
@pytest.mark.parametrize("m, n, k", [(320, 960, 4), (700, 240, 8), (400, 400, 16), (1100, 1000, 8)])
def test_top_subspace_within_kohyas_float32_error(m, n, k):
    matrix = decaying_matrix(m, n, 0.6, seed=k)
    u64, s64, vh64 = torch.linalg.svd(matrix.double(), full_matrices=False)
    kohya_u = torch.linalg.svd(matrix)[0][:, :k]  # kohya: float32, full matrices
    top = top_singular(matrix, k)
    assert top.iterations > 0  # the randomized path, not the dense fallback
    assert (m * n > REFINE_BELOW) == ((m, n) == (1100, 1000))
    kohya_error = subspace_error(kohya_u, u64[:, :k])
    assert subspace_error(top.U, u64[:, :k]) <= kohya_error
    assert subspace_error(top.V, vh64[:k].T) <= subspace_error(torch.linalg.svd(matrix)[2][:k].T, vh64[:k].T)
    torch.testing.assert_close(top.S, s64[:k], rtol=1e-6, atol=0)


def test_flat_spectrum_falls_back_to_the_exact_svd():
    matrix = torch.randn(300, 500, generator=torch.Generator().manual_seed(1))
    top = top_singular(matrix, 4, max_iter=2)
    assert top.iterations == 0
    u64, s64, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    assert subspace_error(top.U, u64[:, :4]) < 1e-10


def test_small_and_zero_matrices():
    small = torch.randn(40, 30)
    top = top_singular(small, 50)
    assert top.S.shape == (30,) and top.iterations == 0
    zero = top_singular(torch.zeros(300, 400), 4)
    assert float(zero.S.abs().max()) == 0


def test_span_error_is_the_sine_of_the_largest_principal_angle_of_unnormalised_columns():
    angle = 0.3
    e = torch.eye(4, dtype=torch.float64)
    reference = torch.stack([5 * e[0], 0.5 * e[1]], dim=1)  # like up = U S: orthogonal, not orthonormal
    tilted = math.cos(angle) * e[1] + math.sin(angle) * e[2]
    # span{e0, tilted} meets the reference plane along e0 and leaves it at `angle`; the columns are
    # neither orthogonal nor unit length.
    columns = torch.stack([-2 * e[0], e[0] + 3 * tilted], dim=1)
    assert span_error(columns, reference) == pytest.approx(math.sin(angle), rel=1e-12)
    assert span_error(columns.float(), reference) == pytest.approx(math.sin(angle), rel=1e-6)
    assert span_error(reference * -3, reference) < 1e-15  # scaling and signs do not move a span
    assert span_error(e[:, 2:], reference) == pytest.approx(1.0)
