"""The loop fetches batches without touching torch's global RNG, which makes resumed runs exact."""

import torch
from torch.utils.data import DataLoader

from library.training.loop import _without_global_rng


def test_fetching_batches_leaves_the_global_rng_where_it_was():
    loader = DataLoader(list(range(6)), batch_size=2, shuffle=False)
    torch.manual_seed(0)
    seeded = torch.get_rng_state()
    assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3], [4, 5]]
    assert not torch.equal(torch.get_rng_state(), seeded)  # a plain DataLoader draws its base seed

    torch.manual_seed(0)
    assert [batch.tolist() for batch in _without_global_rng(loader)] == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(torch.get_rng_state(), seeded)
