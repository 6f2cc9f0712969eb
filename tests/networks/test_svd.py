"""The factored SVD against a dense ``torch.linalg.svd`` of ``up @ down``, and kohya's rank rules."""

import math

import pytest
import torch
import torch.nn.functional as F

from networks.svd import (
    DYNAMIC_METHODS,
    NonFiniteFactors,
    factored_singular_values,
    factored_svd,
    kohya_dynamic_rank,
    lora_matrices,
    lora_pair,
    retention,
    select_rank,
    symmetric_gram,
    tucker_to_lora_down,
)
from tests.kohya_reference import dense_svd, dense_truncation, kohya_rank

# (out, in, kernel, rank): linear, rank above min(out, in), 3x3 conv, 1x1 conv
SHAPES = [(48, 40, None, 8), (6, 20, None, 10), (16, 8, 3, 6), (12, 10, 1, 4)]
PARAMS = {
    "sv_ratio": [1.0, 1.5, 2.0, 4.0, 8.0, 30.0, 1e4],
    "sv_fro": [0.1, 0.5, 0.9, 0.99, 0.9999],
    "sv_cumulative": [0.1, 0.5, 0.9, 0.99, 0.9999],
}


def random_lora(out, inp, kernel, rank, seed=0, dtype=torch.float32):
    """Factors with a decaying spectrum, in kohya's layout."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -3, rank)
    up = torch.randn(out, rank, generator=g) * decay
    down = torch.randn(rank, inp * (kernel or 1) ** 2, generator=g)
    if kernel:
        return up.reshape(out, rank, 1, 1).to(dtype), down.reshape(rank, inp, kernel, kernel).to(dtype)
    return up.to(dtype), down.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_singular_values_match_the_dense_svd(shape):
    up, down = random_lora(*shape)
    _, dense, _ = dense_svd(up, down)
    svd = factored_svd(up, down)
    kept = min(shape[3], len(dense))
    assert len(svd.S) == kept
    torch.testing.assert_close(svd.S, dense[:kept], rtol=1e-5, atol=1e-12)
    assert torch.all(dense[kept:] < 1e-12 * dense[0])  # the rest is zero
    torch.testing.assert_close(factored_singular_values(up, down), svd.S, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES)
def test_truncation_equals_the_dense_rank_k_truncation(shape):
    up, down = random_lora(*shape)
    u, s, vh = dense_svd(up, down)
    svd = factored_svd(up, down)
    alpha, old_rank = 3.0, shape[3]
    for rank in range(1, len(svd.S) + 1):
        new_up, new_down = lora_pair(*svd.truncate(rank), down.shape)
        assert new_up.shape[0] == up.shape[0] and new_down.shape[1:] == down.shape[1:]
        new_alpha = alpha / old_rank * rank  # kohya keeps alpha / rank
        resized = lora_matrices(new_up, new_down)
        ours = resized[0] @ resized[1] * (new_alpha / rank)
        expected = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank] * (alpha / old_rank)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-9 * float(s[0]))


def test_singular_vectors_are_orthonormal():
    svd = factored_svd(*random_lora(48, 40, None, 8))
    left, right = svd.singular_vectors(5)
    torch.testing.assert_close(left.T @ left, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(right.T @ right, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_half_precision_factors_are_decomposed_in_float64():
    up, down = random_lora(48, 40, None, 8, dtype=torch.float16)
    svd = factored_svd(up, down)
    assert svd.S.dtype == torch.float64
    torch.testing.assert_close(svd.S, dense_svd(up, down)[1][:8], rtol=1e-10, atol=1e-12)


def test_rank_deficient_factors():
    up, down = random_lora(30, 20, None, 6)
    up[:, 3:] = up[:, :3]  # rank 3 stored as rank 6
    svd = factored_svd(up, down)
    _, dense, _ = dense_svd(up, down)
    # Zero singular values come out of a squared (Gram) spectrum: zero to ~1e-8 of the largest.
    torch.testing.assert_close(svd.S, dense[:6], rtol=1e-5, atol=1e-7 * float(dense[0]))
    new_up, new_down = svd.truncate(3)
    torch.testing.assert_close(new_up @ new_down, dense_truncation(up, down, 3), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", DYNAMIC_METHODS)
def test_dynamic_ranks_match_kohyas_rule_on_the_dense_spectrum(shape, method):
    up, down = random_lora(*shape)
    _, dense, _ = dense_svd(up, down)
    spectrum = factored_svd(up, down).S
    for param in PARAMS[method]:
        for max_rank in (2, 5, 64):
            kohya = kohya_rank(dense, method, param, max_rank)
            choice = select_rank(spectrum, max_rank, len(dense), method, param)
            assert choice.kohya_rank == kohya, (method, param, max_rank)
            assert choice.rank == min(kohya, len(spectrum))
            assert choice.capped_at_input == (kohya > len(spectrum))


def test_kohyas_documented_examples():
    # S = [10, 5, 1, 0.1, 0, ...] (research/kohya.md §5, run against sd-scripts): one extra rank.
    spectrum = torch.tensor([10.0, 5.0, 1.0, 0.1], dtype=torch.float64)
    assert kohya_dynamic_rank(spectrum, "sv_cumulative", 0.9, full_length=10) == 3
    assert kohya_dynamic_rank(spectrum, "sv_ratio", 20, full_length=10) == 4
    assert kohya_dynamic_rank(spectrum, "sv_ratio", 1.0, full_length=10) == 2


def test_a_target_never_reached_goes_to_kohyas_clamp():
    spectrum = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    # kohya's dense spectrum has 7 zeros more; sv_ratio 1e9 counts all 3 non-zero values
    assert kohya_dynamic_rank(spectrum, "sv_ratio", 1e9, full_length=10) == 4
    choice = select_rank(spectrum, 64, 10, "sv_ratio", 1e9)
    assert (choice.rank, choice.kohya_rank, choice.capped_at_input) == (3, 4, True)
    # full_length caps as kohya's index clamp does
    assert kohya_dynamic_rank(spectrum, "sv_ratio", 1e9, full_length=3) == 3


def test_fixed_rank_is_capped_at_the_update_rank():
    spectrum = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert (select_rank(spectrum, 2, 10).rank, select_rank(spectrum, 8, 10).rank) == (2, 3)


@pytest.mark.parametrize(("out", "inp"), [(16, 12), (12, 16)])  # either factor may be the one QR'd
def test_zero_module_gets_rank_one_like_kohya(out, inp):
    up, down = random_lora(out, inp, None, 4)
    up.zero_()
    svd = factored_svd(up, down)
    for method in (None, *DYNAMIC_METHODS):
        assert select_rank(svd.S, 8, 12, method, 0.5 if method else None).rank == 1
    new_up, new_down = svd.truncate(1)
    assert new_up.shape == (out, 1) and not new_up.any()
    assert torch.linalg.vector_norm(new_down).item() == pytest.approx(1.0)  # a valid unit direction, like kohya's


def test_bad_arguments():
    spectrum = torch.tensor([1.0, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="positive"):
        kohya_dynamic_rank(spectrum, "sv_ratio", 0.0, 4)
    with pytest.raises(ValueError, match="unknown dynamic method"):
        kohya_dynamic_rank(spectrum, "sv_knee", 0.5, 4)
    with pytest.raises(ValueError, match="needs --dynamic_param"):
        select_rank(spectrum, 4, 4, "sv_fro", None)
    with pytest.raises(ValueError, match="rank mismatch"):
        lora_matrices(torch.zeros(8, 4), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="1x1"):
        lora_matrices(torch.zeros(8, 4, 3, 3), torch.zeros(4, 6, 3, 3))


def test_retention_figures():
    spectrum = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    kept = retention(spectrum, 2)
    assert kept.sum_retained == pytest.approx(6 / 8)
    assert kept.fro_retained == pytest.approx((20 / 22) ** 0.5)
    assert kept.max_ratio == pytest.approx(2.0)
    assert math.isnan(retention(torch.zeros(3, dtype=torch.float64), 1).fro_retained)  # kohya prints nan too


def test_tucker_locon_folds_into_a_plain_locon():
    g = torch.Generator().manual_seed(1)
    down, mid, up = (
        torch.randn(4, 6, 1, 1, generator=g),
        torch.randn(4, 4, 3, 3, generator=g),
        torch.randn(5, 4, 1, 1, generator=g),
    )
    x = torch.randn(2, 6, 7, 7, generator=g)
    tucker = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    folded = tucker_to_lora_down(mid, down)
    assert folded.shape == (4, 6, 3, 3)
    torch.testing.assert_close(F.conv2d(F.conv2d(x, folded, padding=1), up), tucker, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 8, 13, 512])
def test_symmetric_gram_equals_the_full_product(rows):
    matrix = torch.randn(rows, 37, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)
    gram = symmetric_gram(matrix)
    torch.testing.assert_close(gram, matrix @ matrix.T, rtol=1e-13, atol=1e-13)
    assert torch.equal(gram, gram.T)


# (out, in, rank): up is the short factor; down^T is (in < out); rank above the short side (no full QR)
@pytest.mark.parametrize("shape", [(48, 40, 8), (40, 48, 8), (6, 20, 10), (20, 6, 10)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_anywhere_in_a_factor_is_found(shape, bad):
    """The check runs on the small Gram matrices; every position of either factor must reach them."""
    out, inp, rank = shape
    up, down = random_lora(out, inp, None, rank)
    for factor in ("up", "down"):
        tensor = up if factor == "up" else down
        for index in [(0, 0), (tensor.shape[0] - 1, tensor.shape[1] - 1), (tensor.shape[0] // 2, 1)]:
            broken = tensor.clone()
            broken[index] = bad
            pair = (broken, down) if factor == "up" else (up, broken)
            for decompose in (factored_svd, factored_singular_values):
                with pytest.raises(NonFiniteFactors):
                    decompose(*pair)
            # also in a zero factor (a module that was never trained), where products with 0 may be skipped
            zeroed = (broken, torch.zeros_like(down)) if factor == "up" else (torch.zeros_like(up), broken)
            with pytest.raises(NonFiniteFactors):
                factored_svd(*zeroed)
