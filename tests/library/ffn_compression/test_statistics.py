"""HiddenStats against numpy's mean and covariance of the same rows."""

import numpy as np
import torch

from library.ffn_compression.statistics import HiddenStats


def test_chunked_sums_give_numpys_mean_and_covariance():
    rows = torch.randn(300, 6) @ torch.randn(6, 6) + torch.arange(6.0)
    stats = HiddenStats.empty(6)
    for chunk in (rows[:100].reshape(4, 25, 6), rows[100:250], rows[250:]):  # any leading shape
        stats.add(chunk)
    reference = rows.double().numpy()
    assert stats.count == 300
    np.testing.assert_allclose(stats.mean.numpy(), reference.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.covariance().numpy(), np.cov(reference, rowvar=False, bias=True), atol=1e-5)


def test_state_dict_round_trip():
    stats = HiddenStats.empty(3)
    stats.add(torch.randn(10, 3))
    again = HiddenStats.from_state_dict(stats.state_dict("x."), "x.")
    assert again.count == 10 and torch.equal(again.total, stats.total) and torch.equal(again.outer, stats.outer)
