"""The toy world's images, captions, split and dataset folder."""

import colorsys

import numpy as np
import pytest

from library.data.dataset_config import build_blueprints
from library.data.image_sources import load_subset_images
from library.toy_world.generator import (
    COLOURS,
    SHAPES,
    SIZE,
    combination_split,
    image_rng,
    render,
    sample_images,
    sample_spec,
    shape_mask,
    write_dataset,
)
from tests.library.dataset_helpers import dataset_args


def test_split_holds_out_each_colour_once_and_each_shape_twice():
    pretraining, held_out = combination_split(0)
    assert sorted(pretraining + held_out) == sorted((c, s) for c in COLOURS for s in SHAPES)
    assert not set(pretraining) & set(held_out)
    assert sorted(c for c, _ in held_out) == sorted(COLOURS)
    assert {s: sum(1 for _, x in held_out if x == s) for s in SHAPES} == dict.fromkeys(SHAPES, 2)
    assert combination_split(0) == combination_split(0) and combination_split(1) != combination_split(0)


def test_image_depends_only_on_seed_and_index():
    combos = [("red", "star"), ("blue", "ring"), ("white", "cross")]
    whole = sample_images(combos, 6, seed=3)
    tail = sample_images(combos, 3, seed=3, first_index=3)
    for (spec_a, image_a), (spec_b, image_b) in zip(whole[3:], tail):
        assert spec_a == spec_b and np.array_equal(np.asarray(image_a), np.asarray(image_b))
    other_seed = sample_images(combos, 6, seed=4)
    assert whole[0][0] != other_seed[0][0]
    assert [s.caption for s, _ in whole[:3]] == ["a red star", "a blue ring", "a white cross"]


@pytest.mark.parametrize("colour", COLOURS)
def test_foreground_stands_out_from_background(colour):
    for index in range(40):
        spec = sample_spec(image_rng(0, index), colour, "square")
        fg_h, fg_s, fg_v = colorsys.rgb_to_hsv(*spec.foreground)
        _, bg_s, bg_v = colorsys.rgb_to_hsv(*spec.background)
        assert bg_s <= 0.12
        # a saturated foreground, or a grey one at least 0.2 brighter or darker than the background
        assert fg_s >= 0.6 or abs(fg_v - bg_v) >= 0.2


def test_shape_fits_inside_image_and_has_the_specified_colours():
    spec = sample_spec(image_rng(0, 7), "green", "circle")
    pixels = np.asarray(render(spec), dtype=np.float32) / 255
    cx, cy = spec.centre
    assert np.allclose(pixels[int(cy), int(cx)], spec.foreground, atol=1 / 255)
    assert np.allclose(pixels[0, 0], spec.background, atol=1 / 255)
    coverage = shape_mask("circle", spec.centre, spec.radius)
    assert coverage[0].max() == coverage[-1].max() == coverage[:, 0].max() == coverage[:, -1].max() == 0
    # The drawn area matches the continuous disc within anti-aliasing.
    assert coverage.sum() == pytest.approx(np.pi * spec.radius**2, rel=0.02)


def test_unknown_words_are_refused():
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        sample_spec(image_rng(0, 0), "mauve", "star")
    with pytest.raises(ValueError, match="unknown shape 'oval'"):
        sample_spec(image_rng(0, 0), "red", "oval")


def test_dataset_folder_is_read_as_a_dreambooth_subset(tmp_path):
    combos = [("red", "star"), ("blue", "ring")]
    paths = write_dataset(tmp_path / "img" / "1_toy", combos, per_combination=2, seed=0)
    assert len(paths) == 4 and all(p.with_suffix(".txt").is_file() for p in paths)
    args = dataset_args(train_data_dir=str(tmp_path / "img"), resolution="64", caption_extension=".txt")
    (blueprint,) = build_blueprints(args)
    records = load_subset_images(blueprint.subsets[0], 0).records
    assert sorted(r.caption for r in records) == ["a blue ring", "a blue ring", "a red star", "a red star"]
    assert {tuple(r.size) for r in records} == {(SIZE, SIZE)}
