"""Scoring a toy model: seeded samples, reconstruction checks and the accuracy counts."""

import numpy as np
import pytest

from library.toy_world.evaluate import Accuracy, generate, reconstruction_report, sample_report
from library.toy_world.generator import sample_images
from library.toy_world.model import build_toy_model, tokenizer_cache_folder, write_toy_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tokenizer = write_toy_tokenizer(tokenizer_cache_folder(tmp_path_factory.mktemp("tok")))
    return build_toy_model(tokenizer, seed=0)


def test_samples_are_a_function_of_their_seeds(model):
    first = generate(model, ["a red star", "a blue ring"], [1, 2], steps=2)
    again = generate(model, ["a red star", "a blue ring"], [1, 2], steps=2)
    other = generate(model, ["a red star"], [3], steps=2)
    assert [im.size for im in first] == [(64, 64), (64, 64)]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))


def test_reports_count_every_image(model):
    samples = sample_report(model, [("red", "star"), ("blue", "ring")], per_combination=2, seed=0, steps=2)
    assert samples.total == 4
    accuracy, psnr = reconstruction_report(model.vae, [("red", "star")], count=3, seed=0)
    assert accuracy.total == 3 and np.isfinite(psnr)


def test_accuracy_counts_colour_shape_and_confusions():
    accuracy = Accuracy()
    for spec, image in sample_images([("red", "star"), ("blue", "ring")], 2, seed=0):
        accuracy.add(spec.colour, spec.shape, image)  # read correctly
    (_, image), *_ = sample_images([("green", "cross")], 1, seed=0)
    accuracy.add("green", "square", image)  # the right colour, the wrong shape
    assert accuracy.rates() == {"colour": 1.0, "shape": 2 / 3, "both": 2 / 3}
    assert accuracy.confusion == {("square", "cross"): 1}
    assert accuracy.hits == [True, True, False]  # each sample's verdict, in order, for paired comparisons


def test_a_model_loaded_from_its_single_file_samples_the_same_images(model, tmp_path):
    """Single files carry SD's VAE sample_size (512): sampling must not take the size from it."""
    import torch

    from library.models.stable_diffusion import load_stable_diffusion, save_ldm_checkpoint

    tokenizers = tmp_path / "tokenizers"
    write_toy_tokenizer(tokenizer_cache_folder(tokenizers))
    save_ldm_checkpoint(model, tmp_path / "toy.safetensors")
    loaded = load_stable_diffusion(tmp_path / "toy.safetensors", tokenizer_cache_dir=tokenizers)
    assert loaded.vae.config.sample_size != 64  # the trap this test guards against
    for module in (loaded.text_encoder, loaded.vae, loaded.unet):
        module.to(torch.float32)
    expected = generate(model, ["a red star"], [1], steps=2)
    found = generate(loaded, ["a red star"], [1], steps=2)
    assert found[0].size == (64, 64)
    difference = np.abs(np.asarray(found[0], dtype=int) - np.asarray(expected[0], dtype=int))
    assert difference.max() <= 1  # rounding of the saved weights, nothing else


def test_every_sample_of_a_report_has_its_own_noise(model, monkeypatch):
    from library.toy_world import evaluate

    seeds, real_generate = [], evaluate.generate

    def recording(model, prompts, chunk_seeds, **sampling):
        seeds.extend(chunk_seeds)
        return real_generate(model, prompts, chunk_seeds, **sampling)

    monkeypatch.setattr(evaluate, "generate", recording)
    sample_report(model, [("red", "star"), ("blue", "ring"), ("green", "cross")], per_combination=2, seed=0, steps=1)
    assert len(seeds) == 6 and len(set(seeds)) == 6
