"""Procedural toy images: one coloured shape on a plain background, with a caption naming both.

The toy world stands in for real photographs where a method must be judged by its results: the
captions use a small vocabulary (``a red star``), every image is drawn from a seed, and
:mod:`library.toy_world.classifier` reads an image back into (colour, shape), so samples of a model
trained on these images can be scored without a human looking at them.
"""

from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn at 4x and area-averaged down: anti-aliased, deterministic edges

# Chromatic colours by hue in degrees: 30-45 degrees apart, so a sample whose hue drifts by up to
# ~15 degrees still reads as the colour it was asked for.
HUES = {
    "red": 0.0,
    "orange": 30.0,
    "yellow": 60.0,
    "lime": 95.0,
    "green": 135.0,
    "cyan": 180.0,
    "blue": 225.0,
    "purple": 270.0,
    "pink": 315.0,
}
# Achromatic colours by HSV value (brightness); saturation 0.
GREYS = {"white": 0.95, "gray": 0.55, "black": 0.1}
COLOURS = tuple(HUES) + tuple(GREYS)
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")

CHROMA_SATURATION = 0.85
CHROMA_VALUE = 0.9
# Backgrounds are nearly grey (saturation <= BACKGROUND_MAX_SATURATION) in a light or a dark band;
# a white foreground gets a dark background, a black one a light background, so the foreground
# always differs from the background by saturation or by at least 0.2 in brightness.
BACKGROUND_MAX_SATURATION = 0.12
LIGHT_BAND = (0.75, 0.9)
DARK_BAND = (0.15, 0.3)
RADIUS_RANGE = (12.0, 21.0)  # circumradius in pixels
MARGIN = 3.0


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that determines one image."""

    colour: str
    shape: str
    centre: tuple[float, float]
    radius: float
    foreground: tuple[float, float, float]  # RGB in [0, 1]
    background: tuple[float, float, float]

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape)


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def combination_split(seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(pretraining, held-out) colour/shape combinations.

    Each colour is held out with exactly one shape and each shape with two colours, so every word
    is still seen in pretraining and the held-out set tests composition, not new words.
    """
    order = np.random.default_rng(seed).permutation(len(SHAPES))
    held_out = [(colour, SHAPES[order[i % len(SHAPES)]]) for i, colour in enumerate(COLOURS)]
    pretraining = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held_out]
    return pretraining, held_out


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb((h / 360.0) % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))


def sample_spec(rng: np.random.Generator, colour: str, shape: str) -> ShapeSpec:
    """Random position, size, exact shade and background for one colour/shape pair."""
    if colour in HUES:
        foreground = _hsv(
            HUES[colour] + rng.uniform(-4, 4),
            CHROMA_SATURATION + rng.uniform(-0.1, 0.1),
            CHROMA_VALUE + rng.uniform(-0.08, 0.06),
        )
        band = LIGHT_BAND if rng.random() < 0.5 else DARK_BAND
    elif colour in GREYS:
        foreground = _hsv(0.0, 0.0, GREYS[colour] + rng.uniform(-0.04, 0.04))
        band = {"white": DARK_BAND, "black": LIGHT_BAND}.get(colour, LIGHT_BAND if rng.random() < 0.5 else DARK_BAND)
    else:
        raise ValueError(f"unknown colour {colour!r} (known: {', '.join(COLOURS)})")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    background = _hsv(rng.uniform(0, 360), rng.uniform(0, BACKGROUND_MAX_SATURATION), rng.uniform(*band))
    radius = float(rng.uniform(*RADIUS_RANGE))
    low, high = radius + MARGIN, SIZE - radius - MARGIN
    centre = (float(rng.uniform(low, high)), float(rng.uniform(low, high)))
    return ShapeSpec(colour, shape, centre, radius, foreground, background)


def _polygon(cx: float, cy: float, radii: list[float], start_degrees: float) -> list[tuple[float, float]]:
    angles = np.deg2rad(start_degrees + 360.0 * np.arange(len(radii)) / len(radii))
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]


def shape_mask(shape: str, centre: tuple[float, float], radius: float, size: int = SIZE) -> np.ndarray:
    """Coverage of each pixel by the shape, float in [0, 1], anti-aliased by supersampling."""
    k = SUPERSAMPLE
    cx, cy, r = centre[0] * k, centre[1] * k, radius * k
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            inner = 0.55 * r
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif shape == "square":
        half = 0.8 * r
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=255)
    elif shape == "triangle":  # equilateral, pointing up, centred on its centroid
        draw.polygon(_polygon(cx, cy + 0.1 * r, [1.1 * r] * 3, -90.0), fill=255)
    elif shape == "star":  # five points, inner radius 0.45 of the outer
        draw.polygon(_polygon(cx, cy + 0.05 * r, [1.1 * r, 0.5 * r] * 5, -90.0), fill=255)
    elif shape == "cross":  # a plus sign
        arm, half = r, 0.33 * r
        draw.rectangle([cx - arm, cy - half, cx + arm, cy + half], fill=255)
        draw.rectangle([cx - half, cy - arm, cx + half, cy + arm], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(spec: ShapeSpec) -> Image.Image:
    """The RGB image of ``spec``: the foreground composited over the background by coverage."""
    alpha = shape_mask(spec.shape, spec.centre, spec.radius)[..., None]
    pixels = alpha * np.asarray(spec.foreground, np.float32) + (1 - alpha) * np.asarray(spec.background, np.float32)
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8))


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``: independent of how many images are drawn or in what order."""
    return np.random.default_rng([seed, index])


def sample_images(
    combinations: list[tuple[str, str]], count: int, seed: int, first_index: int = 0
) -> list[tuple[ShapeSpec, Image.Image]]:
    """``count`` images cycling through ``combinations``; image i is a function of (seed, i) only."""
    out = []
    for i in range(first_index, first_index + count):
        colour, shape = combinations[i % len(combinations)]
        spec = sample_spec(image_rng(seed, i), colour, shape)
        out.append((spec, render(spec)))
    return out


def write_dataset(
    folder: str | os.PathLike,
    combinations: list[tuple[str, str]],
    per_combination: int,
    seed: int,
    first_index: int = 0,
) -> list[Path]:
    """PNG images with ``.txt`` captions in ``folder`` (a kohya DreamBooth subset folder such as
    ``img/1_toy``); returns the image paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for offset, (spec, image) in enumerate(
        sample_images(combinations, per_combination * len(combinations), seed, first_index)
    ):
        stem = f"{first_index + offset:05d}_{spec.colour}_{spec.shape}"
        image.save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(spec.caption + "\n")
        paths.append(folder / f"{stem}.png")
    return paths
