"""top_singular against float64 dense SVDs: within kohya's own float32 error, and exact fallbacks."""

import pytest
import torch

from library.lora_tools.truncated_svd import subspace_error, top_singular
from library.synthetic_lora import decaying_matrix


@pytest.mark.parametrize("m, n, k", [(320, 960, 4), (700, 240, 8), (400, 400, 16)])
def test_top_subspace_within_kohyas_float32_error(m, n, k):
    matrix = decaying_matrix(m, n, 0.6, seed=k)
    u64, s64, vh64 = torch.linalg.svd(matrix.double(), full_matrices=False)
    kohya_u = torch.linalg.svd(matrix)[0][:, :k]  # kohya: float32, full matrices
    top = top_singular(matrix, k)
    assert top.iterations > 0  # the randomized path, not the dense fallback
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
