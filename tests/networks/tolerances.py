"""The one table of tolerances for comparing two evaluations of the same math done in another order."""

import torch

TOLERANCES = {
    # Whole tiny models are compared in float64: their random weights amplify rounding up to ~1e3x at
    # late timesteps (float32 vs float64 differ by 2.5e-4 at t=999), which float64 makes negligible.
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    # float32 sums regrouped (merged weight vs two matmuls, conv vs matmul): ~1e-7 relative per
    # rounding, over a few hundred chained ops of the tiny models.
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    # bfloat16 keeps 8 significant bits: 2^-8 ~ 4e-3 per rounding, a few roundings per layer.
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])
