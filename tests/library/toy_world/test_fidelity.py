"""Distances to an original model: pixel fidelity of samples from the same noise, and prediction MSE."""

import copy

import numpy as np
import pytest
import torch

from library.toy_world.evaluate import sample_jobs, sample_report
from library.toy_world.fidelity import (
    SampleSet,
    draw_samples,
    fidelity,
    prediction_batch,
    prediction_mse,
)
from library.toy_world.model import build_toy_model, tokenizer_cache_folder, write_toy_tokenizer

COMBINATIONS = [("red", "star"), ("blue", "ring"), ("white", "cross")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tokenizer = write_toy_tokenizer(tokenizer_cache_folder(tmp_path_factory.mktemp("tok")))
    built = build_toy_model(tokenizer, seed=0)
    for module in (built.text_encoder, built.vae, built.unet):
        module.eval().requires_grad_(False)
    return built


def test_fidelity_is_the_pixel_mse_and_its_psnr():
    jobs = [("red", "star", 1), ("blue", "ring", 2)]
    pixels = np.random.default_rng(0).uniform(0.2, 0.8, (2, 64, 64, 3)).astype(np.float32)
    reference = SampleSet(jobs, pixels)
    assert fidelity(reference, reference).mse == 0 and fidelity(reference, reference).psnr == float("inf")
    shifted = fidelity(SampleSet(jobs, pixels + 0.1), reference)
    assert shifted.mse == pytest.approx(0.01, rel=1e-4)
    assert shifted.psnr == pytest.approx(20.0, abs=1e-3)  # 10 log10(1 / 0.01)
    with pytest.raises(ValueError):
        fidelity(SampleSet(jobs[::-1], pixels), reference)


def test_drawn_samples_are_those_sample_report_scores(model):
    """The same prompts and noise seeds as sample_report, so the bench's accuracies are the base rows'."""
    jobs = sample_jobs(COMBINATIONS, per_combination=2, seed=3)
    drawn = draw_samples(model, jobs, steps=2)
    expected = sample_report(model, COMBINATIONS, per_combination=2, seed=3, steps=2)
    found = drawn.accuracy()
    assert drawn.pixels.shape == (6, 64, 64, 3) and 0.0 <= drawn.pixels.min() <= drawn.pixels.max() <= 1.0
    assert (found.total, found.colour, found.shape, found.both) == (
        expected.total,
        expected.colour,
        expected.shape,
        expected.both,
    )


def test_another_unet_draws_from_the_same_noise(model):
    jobs = sample_jobs(COMBINATIONS, per_combination=1, seed=0)
    reference = draw_samples(model, jobs, steps=2)
    same = draw_samples(model, jobs, unet=copy.deepcopy(model.unet), steps=2)
    assert fidelity(same, reference).mse == 0
    changed = copy.deepcopy(model.unet)
    with torch.no_grad():
        changed.conv_out.weight.mul_(3.0)
    assert fidelity(draw_samples(model, jobs, unet=changed, steps=2), reference).mse > 0


def test_prediction_mse_compares_two_unets_on_fixed_inputs(model):
    batch = prediction_batch(model, COMBINATIONS, count=4, seed=1)
    again = prediction_batch(model, COMBINATIONS, count=4, seed=1)
    assert torch.equal(batch.noisy, again.noisy) and torch.equal(batch.context, again.context)
    assert prediction_mse(model.unet, model.unet, batch) == 0
    changed = copy.deepcopy(model.unet)
    with torch.no_grad():
        changed.conv_out.bias.add_(0.5)  # every predicted value moves by exactly 0.5
    assert prediction_mse(changed, model.unet, batch) == pytest.approx(0.25, rel=1e-4)
