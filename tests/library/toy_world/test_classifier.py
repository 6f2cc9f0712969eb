"""The pixel classifier reads the generator's images back, also when blurred and noisy."""

import colorsys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from library.toy_world.classifier import UNKNOWN, classify, name_colour, shape_prototypes
from library.toy_world.generator import (
    COLOURS,
    GREYS,
    HUES,
    RADIUS_RANGE,
    SHAPES,
    ShapeSpec,
    render,
    sample_images,
)

ALL = [(c, s) for c in COLOURS for s in SHAPES]


def accuracy(images) -> tuple[float, float]:
    readings = [(spec, classify(image)) for spec, image in images]
    colour = np.mean([r.colour == spec.colour for spec, r in readings])
    shape = np.mean([r.shape == spec.shape for spec, r in readings])
    return float(colour), float(shape)


def test_reads_generated_images():
    colour, shape = accuracy(sample_images(ALL, 288, seed=11))
    assert colour >= 0.98 and shape >= 0.98


def test_reads_blurred_noisy_images():
    rng = np.random.default_rng(0)
    degraded = []
    for spec, image in sample_images(ALL, 144, seed=12):
        pixels = ndimage.gaussian_filter(np.asarray(image, np.float32) / 255, (1.0, 1.0, 0))
        degraded.append((spec, np.clip(pixels + rng.normal(0, 0.04, pixels.shape), 0, 1)))
    colour, shape = accuracy(degraded)
    assert colour >= 0.98 and shape >= 0.98


def test_is_deterministic_and_reads_files(tmp_path):
    (spec, image), *_ = sample_images([("purple", "star")], 1, seed=5)
    image.save(tmp_path / "x.png")
    readings = {classify(image), classify(Image.open(tmp_path / "x.png")), classify(np.asarray(image))}
    assert len({(r.colour, r.shape) for r in readings}) == 1
    assert classify(image).features == classify(image).features
    assert (classify(image).colour, classify(image).shape) == ("purple", "star")


def test_names_pure_colours():
    for name, hue in HUES.items():
        rgb = np.array(colorsys.hsv_to_rgb(hue / 360, 0.9, 0.9))
        assert name_colour(rgb) == name
    for name, value in GREYS.items():
        assert name_colour(np.full(3, value)) == name


def test_blank_image_is_unknown():
    reading = classify(np.full((64, 64, 3), 0.5, np.float32))
    assert (reading.colour, reading.shape) == (UNKNOWN, UNKNOWN)


def test_prototypes_are_well_apart():
    prototypes = shape_prototypes()
    distances = [np.linalg.norm(prototypes[a] - prototypes[b]) for a in SHAPES for b in SHAPES if a < b]
    assert min(distances) > 0.2
    assert set(prototypes) == set(SHAPES)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_is_read_at_every_size(shape):
    for radius in RADIUS_RANGE:  # the smallest and the largest size the generator draws
        spec = ShapeSpec("red", shape, (32.0, 32.0), radius, (0.9, 0.1, 0.1), (0.8, 0.8, 0.8))
        assert classify(render(spec)).shape == shape
