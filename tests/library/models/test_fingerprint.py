"""weights_fingerprint: equal for equal weights in any dtype that holds them, different for other weights."""

import copy

import torch

from library.models.fingerprint import weights_fingerprint


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.GroupNorm(4, 300), torch.nn.Linear(300, 8))


def test_equal_weights_give_equal_fingerprints_in_any_dtype_that_holds_them():
    model = small_model(0).half()
    widened = copy.deepcopy(model).float()  # the same values, as a float32 run of an fp16 file holds them
    fingerprint = weights_fingerprint(model)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert weights_fingerprint(widened) == fingerprint == weights_fingerprint(small_model(0).half())


def test_other_weights_give_other_fingerprints():
    model = small_model(0)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned[2].weight.add_(1e-3 * torch.randn_like(tuned[2].weight))  # a fine-tune moves every weight a little
    buffers = copy.deepcopy(model)
    buffers.register_buffer("scale", torch.ones(3))
    fingerprints = {
        weights_fingerprint(model),
        weights_fingerprint(tuned),
        weights_fingerprint(small_model(1)),
        weights_fingerprint(buffers),
        weights_fingerprint(model, small_model(1)),
        weights_fingerprint(small_model(1), model),  # the order of the modules counts
    }
    assert len(fingerprints) == 6
